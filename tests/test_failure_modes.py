"""What a production run does when something is wrong: bad numbers, an --out that is a file, two jobs on
one folder, a disk that fills up, prompt files of any bytes, long prompts, repeated library warnings."""

import errno
import json
import logging
import math
import os
import random
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from spguard import SPGuard
from spguard.cli import WRITE_FAILED_STATUS, main
from spguard.jobs import LOCK, JobSettings, PromptFileError, read_prompts, run_job

from .helpers import ours
from .test_jobs import (
    SUBPROCESS_TIMEOUT_S,
    TINY_RUN,
    assert_one_complete_set_per_prompt,
    assert_same_outputs,
    images_and_reports,
    prompt_lines,
)


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("spguard: error: "), err
    return lines[0]


# ------------------------------------------------------------------------------------------------
# Bad numbers: refused before anything is drawn
@pytest.mark.parametrize(
    "flags, message",
    [
        (["--guidance-scale", "nan"], "guidance scale must be a finite number, got nan"),
        (["--guidance-scale", "inf"], "guidance scale must be a finite number, got inf"),
        (["--guidance-scale", "-1"], "guidance scale must be at least 0, got -1.0"),
        (["--lambda-max", "nan"], "lambda_max must be a finite number"),
        (["--lambda-max", "inf"], "lambda_max must be a finite number"),
        (["--q", "nan"], "q must lie in (0, 1)"),
        (["--harmfulness-threshold", "nan"], "harmfulness_threshold must be a number, got nan"),
        (["--t-p", "0"], "t_p must be an integer of at least 1"),
        (["--t-drop", "-1"], "t_drop must be a non-negative integer"),
        (["--t-p", "3", "--step-weights", "1,1"], "step_weights must give each of the t_p = 3 phase-1 steps"),
        (["--batch-size", "0"], "batch size must be an integer of at least 1"),
        (["--steps", "0"], "steps must be at least 1"),
        (["--steps", "1001"], "num_inference_steps must be an integer from 1 to the scheduler's 1000, got 1001"),
    ],
)
def test_bad_numbers_are_one_line_exit_2_and_draw_nothing(tmp_path, capsys, flags, message):
    out = tmp_path / "out"
    argv = ["generate", "a cat", "--out", str(out), *TINY_RUN]
    argv = [a for a in argv if a not in ("--steps", "2")] + flags if "--steps" in flags else argv + flags
    assert main(argv) == 2
    assert message in one_error_line(capsys)
    assert not list(out.glob("*.png")) and not (out / "reports.jsonl").exists()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"guidance_scale": math.nan}, "guidance_scale must be a finite number"),
        ({"guidance_scale": -0.5}, "guidance_scale must be at least 0"),
        ({"guidance_scale": "7"}, "guidance_scale must be a finite number"),
        ({"num_inference_steps": 0}, "num_inference_steps must be an integer from 1"),
        ({"num_inference_steps": 2.5}, "num_inference_steps must be an integer from 1"),
        ({"num_inference_steps": 5000}, "num_inference_steps must be an integer from 1 to the scheduler's 1000"),
        ({"height": 33}, "height and width must be positive multiples of 2, got 33x32"),
        ({"width": -32}, "height and width must be positive multiples of 2, got 32x-32"),
        ({"height": 32.0}, "height and width must be positive multiples of 2"),
        ({"height": 0}, "height and width must be positive multiples of 2, got 0x32"),
    ],
)
def test_library_refuses_bad_numbers(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        ours()(["a cat"], **{"num_inference_steps": 2, **kwargs})


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: SPGuard(lambda_max=math.nan), "lambda_max must be a finite number"),
        (lambda: SPGuard(lambda_max=math.inf), "lambda_max must be a finite number"),
        (lambda: SPGuard(harmfulness_threshold=math.nan), "harmfulness_threshold must be a number"),
        (lambda: SPGuard(q=math.nan), r"q must lie in \(0, 1\)"),
        (lambda: SPGuard(t_p=2.5), "t_p must be an integer"),
        (lambda: SPGuard(t_drop=-3), "t_drop must be a non-negative integer"),
        (lambda: SPGuard(t_p=3, step_weights=[1.0, 2.0]), "step_weights must give each of the t_p = 3"),
        (lambda: SPGuard(t_p=2, step_weights=[0, 0, 1]), "step_weights must give .* not all zero"),
        (lambda: SPGuard(t_p=2, step_weights=[1.0, -0.5]), "step_weights must be at least 0"),
        (lambda: SPGuard(t_p=2, step_weights=[1.0, math.nan]), "step_weights must be a finite number"),
        (lambda: JobSettings("tiny", SPGuard(), steps=2, guidance_scale=math.nan, seed=0, batch_size=1),
         "guidance scale must be a finite number"),
        (lambda: JobSettings("tiny", SPGuard(), steps=2, guidance_scale=None, seed=0, batch_size=0),
         "batch size must be an integer of at least 1"),
        (lambda: JobSettings("tiny", SPGuard(), steps=2, guidance_scale=None, seed=2**64, batch_size=1),
         "seed must be an integer from"),
    ],
)
def test_library_refuses_bad_knobs(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_out_naming_a_file_is_one_line(tmp_path, capsys):
    file = tmp_path / "taken.txt"
    file.write_text("keep me")
    assert main(["generate", "a cat", "--out", str(file), *TINY_RUN]) == 2
    assert f"--out {file} is a file, not a folder" in one_error_line(capsys)
    assert file.read_text() == "keep me"


def test_bad_input_in_a_fresh_process_has_no_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "spguard.cli", "generate", "a cat", "--guidance-scale", "nan",
                             "--out", str(tmp_path / "out"), *TINY_RUN], capture_output=True, text=True,
                            timeout=SUBPROCESS_TIMEOUT_S)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["spguard: error: guidance scale must be a finite number, got nan"]


# ------------------------------------------------------------------------------------------------
# One job per output folder
@pytest.mark.slow
def test_second_job_on_a_folder_refuses_and_the_rerun_finds_it_complete(tmp_path, capsys):
    n = 16  # enough that the second job starts while the first draws, on a loaded 2-core machine
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(prompt_lines(n))
    out = tmp_path / "out"
    args = ["generate", "--prompts", str(prompts), "--batch-size", "2", *TINY_RUN, "--out", str(out)]
    first = subprocess.Popen([sys.executable, "-m", "spguard.cli", *args], stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + SUBPROCESS_TIMEOUT_S
    while not list(out.glob("[0-9]*.json")):  # the first job is drawing, under its lock
        assert first.poll() is None, first.stderr.read()
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert main(args) == 2
    line = one_error_line(capsys)
    assert f"{out} is being written by another job (process {first.pid} on " in line
    assert first.poll() is None, "the first job must still have been running"
    assert first.wait(timeout=SUBPROCESS_TIMEOUT_S) == 0, first.stderr.read()
    assert not (out / LOCK).exists()  # released on exit
    assert_one_complete_set_per_prompt(out, n)
    times = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert main(args) == 0
    assert f"wrote {n} images" in capsys.readouterr().out
    changed = {p.name for p in out.iterdir() if times.get(p.name) != p.stat().st_mtime_ns}
    assert changed == {"reports.jsonl"}  # nothing drawn again; only the summary rewritten


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (out / LOCK).write_text(f"process {dead.stdout.strip()} on somewhere\n")  # left by a killed job, unlocked
    assert main(["generate", "a cat", "--out", str(out), *TINY_RUN]) == 0
    assert not (out / LOCK).exists()


# ------------------------------------------------------------------------------------------------
# A full disk loses nothing
class FailingWrites:
    """`open` for spguard.jobs whose writes fail with `code` once `budget` bytes have been written."""

    def __init__(self, budget: int, code: int):
        self.budget, self.code = budget, code

    def __call__(self, path, mode="r", *args, **kwargs):
        f = open(path, mode, *args, **kwargs)
        if "w" not in mode:
            return f
        if self.code == errno.EACCES and self.budget <= 0:
            f.close()
            os.unlink(path)
            raise PermissionError(self.code, os.strerror(self.code), str(path))
        real_write = f.write

        def write(data):
            if len(data) > self.budget:
                real_write(data[: max(self.budget, 0)])  # a short write, as a full disk gives
                self.budget = 0
                raise OSError(self.code, os.strerror(self.code))
            self.budget -= len(data)
            return real_write(data)

        f.write = write
        return f


def assert_nothing_half_done(out):
    names = {p.name for p in out.iterdir()}
    assert not [name for name in names if name.endswith(".tmp")]
    assert not (out / "reports.jsonl").exists()
    reports = sorted(name for name in names if name[:6].isdigit() and name.endswith(".json"))
    for name in reports:
        report = json.loads((out / name).read_text())
        for key in ("image", "cfg_image", "mask_image"):
            if report[key] is not None:
                Image.open(out / report[key]).load()  # complete
    done = {name[:6] for name in reports}
    assert {name[:6] for name in names if name.endswith(".png")} <= done  # no image without its report
    json.loads((out / "manifest.json").read_text())
    return len(reports)


@pytest.mark.parametrize("code, baseline", [(errno.ENOSPC, True), (errno.EIO, False), (errno.EACCES, False)])
def test_failed_write_stops_in_one_line_and_the_rerun_completes_the_job(tmp_path, capsys, monkeypatch, code,
                                                                        baseline):
    n = 4
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(prompt_lines(n))
    args = ["generate", "--prompts", str(prompts), "--batch-size", "2", *TINY_RUN]
    args += ["--with-baseline"] if baseline else []  # a prompt of three files, the third failing
    reference = tmp_path / "reference"
    assert main([*args, "--out", str(reference)]) == 0
    out = tmp_path / "out"
    budget = sum(p.stat().st_size for p in reference.glob("00000[01]*"))  # the first two prompts fit
    import spguard.jobs

    monkeypatch.setattr(spguard.jobs, "open", FailingWrites(budget, code), raising=False)
    capsys.readouterr()
    assert main([*args, "--out", str(out)]) == WRITE_FAILED_STATUS
    line = one_error_line(capsys)
    assert f"spguard: error: cannot write {out}{os.sep}0000" in line and os.strerror(code) in line
    assert 1 <= assert_nothing_half_done(out) < n
    monkeypatch.undo()
    assert main([*args, "--out", str(out)]) == 0
    assert_one_complete_set_per_prompt(out, n)
    assert_same_outputs(out, reference)


def mount_tmpfs(path, size):
    path.mkdir(exist_ok=True)
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True,
                            text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({result.stderr.strip() or 'not permitted'})")


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="tmpfs mounts are Linux's")
def test_small_filesystem_that_fills_up(tmp_path, capsys):
    """A real full disk: a tmpfs of a few pages; then enlarged, and the rerun equals an uninterrupted run."""
    n = 10
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(prompt_lines(n))
    args = ["generate", "--prompts", str(prompts), "--batch-size", "2", *TINY_RUN]
    small = tmp_path / "small"
    mount_tmpfs(small, "48k")  # 12 pages of 4 KiB: room for a few prompts' files
    try:
        out = small / "out"
        assert main([*args, "--out", str(out)]) == WRITE_FAILED_STATUS
        line = one_error_line(capsys)
        assert f"cannot write {out}{os.sep}" in line and "No space left on device" in line
        assert not (out / LOCK).exists()
        assert 1 <= assert_nothing_half_done(out) < n
        subprocess.run(["mount", "-o", "remount,size=4m", str(small)], check=True)
        assert main([*args, "--out", str(out)]) == 0
        assert_one_complete_set_per_prompt(out, n)
        reference = tmp_path / "reference"
        assert main([*args, "--out", str(reference)]) == 0
        assert_same_outputs(out, reference)
        pixels, _ = images_and_reports(out)
        assert len(pixels) == n
    finally:
        subprocess.run(["umount", str(small)], check=True)


# ------------------------------------------------------------------------------------------------
# Prompt files of any bytes
def fuzz_files(rng: random.Random) -> list[tuple[str, bytes]]:
    pieces = ["a red cat", "\u202eabc\u202c", "مرحبا بالعالم", "שלום", "😀🐱‍👤", "\x00", "\r\n", "\r", "\n",
              ",", '"', "\\ud800", "\\udfff", "{", "}", "\t", "\ufeff", "\u2028", "é"]
    files = []
    for k in range(60):
        suffix = [".txt", ".csv", ".jsonl"][k % 3]
        if k % 4 == 0:
            data = rng.randbytes(rng.randrange(1, 400))
        elif k % 4 == 1:  # text made of the awkward pieces
            text = "".join(rng.choice(pieces) for _ in range(rng.randrange(1, 60)))
            data = text.encode("utf-8", "surrogatepass")
        elif k % 4 == 2:  # JSON lines with awkward prompts and fields
            lines = [json.dumps({"prompt": rng.choice(pieces) + " " + rng.choice(pieces),
                                 "seed": rng.choice([1, -2, "3", "x", 1.5, None, "²", 2**70, True]),
                                 "label": rng.choice(["unsafe", 0, "maybe", 1.0])}) for _ in range(5)]
            data = rng.choice(["\n", "\r\n", "\r"]).join(lines).encode()
        else:  # valid text with one corrupted byte
            good = ("prompt,seed\n" if suffix == ".csv" else "") + "a cat\nmarché\n"
            if suffix == ".jsonl":
                good = '{"prompt": "a cat"}\n{"prompt": "marché"}\n'
            raw = bytearray(good.encode())
            raw[rng.randrange(len(raw))] = rng.randrange(256)
            data = bytes(raw)
        files.append((f"fuzz{k}{suffix}", data))
    files += [
        ("deep.jsonl", b"[" * 100_000 + b"\n"),
        ("nul.csv", b"prompt\na\x00cat\n"),
        ("surrogate.jsonl", b'{"prompt": "a cat"}\n{"prompt": "a \\ud800 cat"}\n'),
        ("surrogate.txt", "a cat\na \ud800 cat\n".encode("utf-8", "surrogatepass")),
    ]
    return files


def test_fuzzed_prompt_files_are_read_or_named_by_file_and_line(tmp_path, capsys):
    for name, data in fuzz_files(random.Random(0)):
        path = tmp_path / name
        path.write_bytes(data)
        try:
            records = read_prompts([], path)
        except PromptFileError as exc:
            message = str(exc)
            assert message.startswith(f"{path}:") and "\n" not in message, (name, message)
            assert len(message) < 400, (name, message)
            continue
        for r in records:  # what is accepted is text a tokenizer and a JSON report can take
            assert r.prompt.strip() and "\0" not in r.prompt
            r.prompt.encode("utf-8")
            json.dumps(r.fields)
    # Through the command line: the known bad ones, one line each, exit 2, the line number named.
    for name, line in (("deep.jsonl", 1), ("nul.csv", 2), ("surrogate.jsonl", 2), ("surrogate.txt", 2)):
        assert main(["generate", "--prompts", str(tmp_path / name), "--out", str(tmp_path / "out"), *TINY_RUN]) == 2
        assert f"{tmp_path / name}:{line}: " in one_error_line(capsys)


def test_awkward_but_valid_prompts_are_drawn(tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    long_line = "a red cat " + "blood " * 170_000  # a 1 MB line
    prompts.write_bytes(("مرحبا بالعالم\r\n😀🐱 cat\rשלום a dog\n" + long_line + "\n").encode())
    out = tmp_path / "out"
    assert main(["generate", "--prompts", str(prompts), "--out", str(out), "--steps", "1", "--t-p", "1",
                 "--model", "tiny", "--no-progress"]) == 0
    reports = [json.loads(line) for line in (out / "reports.jsonl").read_text().splitlines()]
    assert [r["prompt"][:6] for r in reports] == ["مرحبا ", "😀🐱 cat", "שלום a", "a red "]
    assert all(r["error"] is None for r in reports)
    warnings = [line for line in capsys.readouterr().err.splitlines() if line]
    assert len(warnings) == 1 and warnings[0].startswith(
        "spguard: warning: prompt 3 was truncated to the text encoder's 77 tokens; dropped: blood blood")
    assert len(warnings[0]) < 400 and "<|endoftext|>" not in warnings[0]


# ------------------------------------------------------------------------------------------------
# Readable warnings
def test_truncation_warning_is_one_line_per_prompt_without_padding(caplog):
    long = "a red cat " * 30 + "and a dog"
    with caplog.at_level(logging.WARNING, logger="spguard.pipeline"):
        ours()(["a cat", long, long + " two"], num_inference_steps=1, output_type="latent", method="cfg")
    messages = [r.getMessage() for r in caplog.records if r.name == "spguard.pipeline"]
    assert len(messages) == 2
    assert messages[0].startswith("prompt 1 was truncated to the text encoder's 77 tokens; dropped: a red cat")
    assert messages[0].endswith("and a dog") and messages[1].endswith("and a dog two")
    assert not any("<|endoftext|>" in m for m in messages)


class RepeatsWarning:
    """The tiny pipeline, logging the same diffusers warning and Python warning on every call."""

    def __init__(self):
        self.pipe = ours()

    def __call__(self, *args, **kwargs):
        logging.getLogger("diffusers.models.fake").warning("a library warning")
        import warnings

        warnings.warn("a deprecation", FutureWarning, stacklevel=1)
        return self.pipe(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.pipe, name)


class Recorder(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_repeated_library_warnings_show_once_per_run(tmp_path):
    records = read_prompts(["a cat", "a dog", "a tree"], None)
    settings = JobSettings(model="tiny", method=SPGuard(t_p=1), steps=1, guidance_scale=None, seed=0, batch_size=1)
    shown = Recorder()  # stands for diffusers' own handler, which writes to the terminal
    logging.getLogger("diffusers").addHandler(shown)
    try:
        with pytest.warns(FutureWarning, match="a deprecation") as recorded:
            run_job(records, settings, tmp_path / "out", lambda device: RepeatsWarning(), progress=False)
    finally:
        logging.getLogger("diffusers").removeHandler(shown)
    assert shown.messages.count("a library warning") == 1
    assert len([w for w in recorded if "a deprecation" in str(w.message)]) == 1
    assert np.isfinite(np.asarray(Image.open(tmp_path / "out" / "000002.png"), dtype=float)).all()
