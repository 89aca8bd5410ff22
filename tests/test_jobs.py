"""Batch jobs: prompt files, crash safety under SIGKILL, resume, failed prompts, torchrun sharding."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from spguard import SPGuard
from spguard.cli import load_pipeline, main
from spguard.jobs import JobSettings, PromptRecord, read_prompts, run_job

from .helpers import ours

TINY_RUN = ["--model", "tiny", "--steps", "2", "--t-p", "1", "--no-progress"]
KILL_AFTER = 3  # reports on disk before the kill
KILL_PROMPTS = 16  # enough that the kill lands mid-run on a loaded 2-core machine
SUBPROCESS_TIMEOUT_S = 300


def prompt_lines(n: int) -> str:
    words = ["a red cat", "blood knife", "a dog in a garden", "a naked man", "a peaceful forest", "a gun fight"]
    return "".join(f"{words[k % len(words)]} {k}\n" for k in range(n))


def folder_files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def images_and_reports(out: Path) -> tuple[dict, list]:
    """Pixels of every PNG and every report line: what must not depend on kills, resumes or ranks."""
    pixels = {p.name: np.asarray(Image.open(p)) for p in sorted(out.glob("*.png"))}
    return pixels, (out / "reports.jsonl").read_text().splitlines()


def assert_same_outputs(a: Path, b: Path):
    pixels_a, reports_a = images_and_reports(a)
    pixels_b, reports_b = images_and_reports(b)
    assert pixels_a.keys() == pixels_b.keys()
    for name in pixels_a:
        np.testing.assert_array_equal(pixels_a[name], pixels_b[name], err_msg=name)
    assert reports_a == reports_b


def assert_one_complete_set_per_prompt(out: Path, n: int):
    names = {p.name for p in out.iterdir()}
    assert not [name for name in names if name.endswith(".tmp")]
    for k in range(n):
        assert f"{k:06d}.json" in names and f"{k:06d}.png" in names
        Image.open(out / f"{k:06d}.png").load()  # a truncated PNG raises here
    lines = [json.loads(line) for line in (out / "reports.jsonl").read_text().splitlines()]
    assert [r["index"] for r in lines] == list(range(n))


# ------------------------------------------------------------------------------------------------
# Prompt files
def test_prompt_file_formats(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("a cat\n\n  a dog  \n")
    assert [(r.index, r.prompt, r.seed, r.fields) for r in read_prompts(["first"], txt)] == [
        (0, "first", None, {}), (1, "a cat", None, {}), (2, "a dog", None, {})]

    csv_file = tmp_path / "p.csv"
    csv_file.write_text('prompt,seed,label,category\n"a cat, sitting",7,benign,animals\nblood,,unsafe,gore\n')
    records = read_prompts([], csv_file)
    assert [(r.prompt, r.seed, r.fields) for r in records] == [
        ("a cat, sitting", 7, {"label": "benign", "category": "animals"}),
        ("blood", None, {"label": "unsafe", "category": "gore"})]

    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"prompt": "a cat", "label": 0}\n\n{"prompt": "blood", "seed": 5, "label": 1, "tags": ["x"]}\n')
    records = read_prompts([], jsonl)
    assert [(r.prompt, r.seed, r.fields) for r in records] == [
        ("a cat", None, {"label": 0}), ("blood", 5, {"label": 1, "tags": ["x"]})]


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("p.csv", b"text,seed\na cat,1\n", "p.csv:1: no 'prompt' column (columns: text, seed)"),
        ("p.csv", b"prompt,seed\na cat,1\nblood,2,extra\n", "p.csv:3: the row's number of values"),
        ("p.csv", b"prompt,seed\na cat,x\n", "p.csv:2: seed must be an integer"),
        ("p.csv", b"prompt,label\na cat,maybe\n", "p.csv:2: label must be one of"),
        ("p.jsonl", b'{"prompt": "a cat"}\n{"prompt": "blood"\n', "p.jsonl:2: not valid JSON"),
        ("p.jsonl", b'{"prompt": "a cat"}\n["blood"]\n', 'p.jsonl:2: expected a JSON object with a "prompt"'),
        ("p.jsonl", b'{"prompt": 3}\n', "p.jsonl:1: the prompt must be a non-empty string"),
        ("p.txt", b"", "p.txt: no prompts in the file"),
        ("p.csv", b"prompt\n", "p.csv: no prompts in the file"),
        ("p.txt", b"a cat\na dog\nna\xefve\n", "p.txt:3: not UTF-8 text"),
        ("p.tsv", b"a cat\n", "p.tsv: unknown prompt file type"),
    ],
)
def test_malformed_prompt_file_is_one_line_and_loses_nothing(tmp_path, capsys, name, content, message):
    out = tmp_path / "out"
    out.mkdir()
    for file_name, data in {"manifest.json": b"{}", "000000.png": b"png", "000000.json": b"{}"}.items():
        (out / file_name).write_bytes(data)  # stands for a finished earlier run
    before = folder_files(out)
    bad = tmp_path / name
    bad.write_bytes(content)
    assert main(["generate", "--prompts", str(bad), "--out", str(out), *TINY_RUN]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith("spguard: error: ") and message in errors[0]
    assert str(bad) in errors[0]
    assert folder_files(out) == before


# ------------------------------------------------------------------------------------------------
# Resume
def test_rerun_with_other_settings_is_refused(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["generate", "a cat", "--out", str(out), *TINY_RUN]) == 0
    before = folder_files(out)
    assert main(["generate", "a cat", "--out", str(out), "--seed", "9", *TINY_RUN]) == 2
    assert "holds a different job (other settings: seed was 0, now 9)" in capsys.readouterr().err
    assert main(["generate", "a dog", "--out", str(out), *TINY_RUN]) == 2
    assert "holds a different job (other prompts" in capsys.readouterr().err
    assert folder_files(out) == before


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_equals_uninterrupted_run(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(prompt_lines(KILL_PROMPTS))
    args = ["generate", "--prompts", str(prompts), "--batch-size", "2", *TINY_RUN]
    killed = tmp_path / "killed"
    job = subprocess.Popen([sys.executable, "-m", "spguard.cli", *args, "--out", str(killed)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + SUBPROCESS_TIMEOUT_S
    while len(list(killed.glob("*.json"))) < KILL_AFTER + 1:  # + 1: manifest.json
        assert job.poll() is None, job.stderr.read().decode()
        assert time.monotonic() < deadline
        time.sleep(0.02)
    job.send_signal(signal.SIGKILL)
    job.wait()
    done = len(list(killed.glob("[0-9]*.json")))
    assert KILL_AFTER <= done < KILL_PROMPTS, "the kill must land mid-run"
    assert not (killed / "reports.jsonl").exists()

    assert main([*args, "--out", str(killed)]) == 0
    assert_one_complete_set_per_prompt(killed, KILL_PROMPTS)
    reference = tmp_path / "reference"
    assert main([*args, "--out", str(reference)]) == 0
    assert_same_outputs(killed, reference)

    # A rerun of a finished job draws nothing and leaves every file as it was.
    times = {p.name: p.stat().st_mtime_ns for p in killed.glob("*.png")}
    assert main([*args, "--out", str(killed)]) == 0
    assert times == {p.name: p.stat().st_mtime_ns for p in killed.glob("*.png")}


# ------------------------------------------------------------------------------------------------
# Failures, seeds, baselines
class NaNFor:
    """The tiny pipeline, but the images of one prompt come out as NaN."""

    def __init__(self, prompt):
        self.pipe, self.prompt = load_pipeline("tiny", "cpu"), prompt

    def __call__(self, prompt, **kwargs):
        out = self.pipe(prompt, **kwargs)
        for k, p in enumerate(prompt):
            if p == self.prompt:
                out.images[k] = np.nan
        return out

    def __getattr__(self, name):
        return getattr(self.pipe, name)


def test_failed_prompts_are_recorded_and_the_job_goes_on(tmp_path):
    # A lone surrogate (which prompt files refuse) is a str, but no text encoder can tokenize it.
    records = [PromptRecord(k, p) for k, p in enumerate(["a cat", "a cat \ud800", "nan please", "a dog"])]
    settings = JobSettings(model="tiny", method=SPGuard(t_p=1), steps=2, guidance_scale=None, seed=0, batch_size=4)
    summary = run_job(records, settings, tmp_path / "out", lambda device: NaNFor("nan please"), progress=False)
    assert (summary.total, summary.failed) == (4, 2)
    reports = [json.loads(line) for line in (tmp_path / "out" / "reports.jsonl").read_text().splitlines()]
    assert reports[1]["error"].startswith("TypeError") and reports[1]["image"] is None
    assert reports[2]["error"] == "the image has NaN or infinite values"
    assert not (tmp_path / "out" / "000001.png").exists() and not (tmp_path / "out" / "000002.png").exists()
    # The others are drawn as if nothing had failed: seed = run seed + index, one prompt per call.
    for k, prompt in ((0, "a cat"), (3, "a dog")):
        assert reports[k]["error"] is None and reports[k]["seed"] == k
        expected = ours()([prompt], seed=[k], num_inference_steps=2, method=SPGuard(t_p=1)).images[0]
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "out" / f"{k:06d}.png")), np.asarray(expected))


def test_with_baseline_draws_cfg_images_and_mask_overlays(tmp_path):
    prompts = tmp_path / "p.csv"
    prompts.write_text("prompt,seed,label\na red cat,,benign\nblood knife gore,11,unsafe\na dog,,benign\n")
    out = tmp_path / "out"
    assert main(["generate", "--prompts", str(prompts), "--with-baseline", "--out", str(out), "--batch-size", "3",
                 *TINY_RUN]) == 0
    reports = [json.loads(line) for line in (out / "reports.jsonl").read_text().splitlines()]
    assert [r["seed"] for r in reports] == [0, 11, 2]
    assert [r["fields"] for r in reports] == [{"label": "benign"}, {"label": "unsafe"}, {"label": "benign"}]
    pipe = ours()
    for r in reports:
        cfg = pipe([r["prompt"]], seed=[r["seed"]], num_inference_steps=2, method="cfg").images[0]
        np.testing.assert_array_equal(np.asarray(Image.open(out / r["cfg_image"])), np.asarray(cfg))
        assert (r["mask_image"] is not None) == r["guided"]
        if r["guided"]:
            overlay = np.asarray(Image.open(out / r["mask_image"]))
            image = np.asarray(Image.open(out / r["image"]))
            assert overlay.shape == image.shape and (overlay != image).any()
    assert any(r["guided"] for r in reports)


# ------------------------------------------------------------------------------------------------
# Several processes
@pytest.mark.slow
def test_torchrun_two_processes_equal_one(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(prompt_lines(7))  # 7 prompts in batches of 2: the ranks get unequal shares
    args = ["generate", "--prompts", str(prompts), "--batch-size", "2", "--with-baseline", *TINY_RUN]
    # torchrun gives each worker one thread unless told otherwise; CPU kernels with another thread count
    # may round differently, so both runs use one thread.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run([sys.executable, "-m", "spguard.cli", *args, "--out", str(one)], env=env, check=True,
                   capture_output=True, timeout=SUBPROCESS_TIMEOUT_S)
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "spguard.cli", *args, "--out", str(two)],
        env=env, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("wrote 7 images") == 1  # rank 0 speaks for the job
    assert_one_complete_set_per_prompt(two, 7)
    assert_same_outputs(one, two)
    assert (one / "manifest.json").read_bytes() == (two / "manifest.json").read_bytes()
