"""Batch generation jobs: prompt files, crash-safe outputs, resume, and sharding over torchrun ranks.

A job writes into its output folder, for the prompt with index k (0-based, in file order):

    NNNNNN.png        the image (k zero-padded to six digits)
    NNNNNN.cfg.png    the CFG image for the same seed (--with-baseline)
    NNNNNN.mask.png   the image with SP-Guard's last mask snapshot overlaid (--masks, guided prompts only)
    NNNNNN.json       the prompt's report; written last, so its presence means the prompt is done
    manifest.json     what the run draws (prompts and settings); a rerun must match it to resume
    reports.jsonl     every report, one line per prompt in index order; written when the whole job is done
    spguard.lock      while a job runs: the lock that keeps a second job out (the id of the process)

Why one small JSON file per prompt rather than appending to one reports.jsonl as we go: every file is
written to a temporary name in the same folder, fsync'ed, and renamed over its final name (os.replace is
atomic within a file system), so a reader sees either no file or a complete one, whenever the process
dies. The report is renamed into place only after the prompt's PNGs are, so "NNNNNN.json exists" means
"all of prompt k's files are complete" and is the one test of done-ness that resume needs. An appended
line could be cut short by a kill and would need repairing; a file per prompt never does, and ranks of a
torchrun job never write to the same file. reports.jsonl is then assembled from the per-prompt files, in
one atomic write, once all prompts are done. A write that fails (a full disk) stops the job after removing
its temporary file and the prompt's other files, so a rerun once there is room goes on where it stopped.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import io
import json
import logging
import os
import re
import socket
import sys
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from .methods import check_finite, is_integer

PROMPT_FORMATS = (".txt", ".csv", ".jsonl")
MANIFEST = "manifest.json"
REPORTS = "reports.jsonl"
LOCK = "spguard.lock"  # held by the job writing the folder (see output_lock)
TMP_SUFFIX = ".tmp"
MANIFEST_VERSION = 1
# Labels a prompt file may give in its `label` column or field: unsafe is the positive class of eval's AUC.
LABELS = {"unsafe": True, "1": True, "benign": False, "0": False}
SEED_RANGE = (-(2**63), 2**64)  # what torch.Generator.manual_seed takes
OVERLAY_COLOR = np.array([255.0, 0.0, 0.0])  # red where SP-Guard's mask guides
OVERLAY_ALPHA = 0.5  # overlay opacity at the mask's strongest point


class PromptFileError(ValueError):
    """A prompt file that cannot be read; the message names the file and line."""


class ResumeError(ValueError):
    """The output folder belongs to a different job, is a file, or is being written by another job."""


class WriteError(OSError):
    """A write into the output folder failed (a full disk, an I/O error, no permission): the job stops, and
    nothing it wrote is left half-done. The message names the file and the cause."""


@dataclass(frozen=True)
class PromptRecord:
    index: int
    prompt: str
    seed: int | None = None  # from the file; None: the run seed + index
    fields: dict = field(default_factory=dict)  # the file's other columns or fields, kept in the report


# ------------------------------------------------------------------------------------------------
# Prompt files
def read_prompts(prompts: list[str], path: Path | None) -> list[PromptRecord]:
    """Prompts given on the command line, then those of a .txt, .csv or .jsonl file, indexed from 0."""
    rows = [(prompt, {}) for prompt in prompts]
    if path is not None:
        rows += _read_prompt_file(Path(path))
    if not rows:
        raise PromptFileError("no prompts given: pass prompts as arguments or --prompts FILE")
    records = []
    for index, (prompt, fields) in enumerate(rows):
        seed = fields.pop("seed", None)
        records.append(PromptRecord(index, prompt, None if seed is None else int(seed), fields))
    return records


def _read_prompt_file(path: Path) -> list[tuple[str, dict]]:
    if not path.is_file():
        raise PromptFileError(f"prompt file not found: {path}")
    if path.suffix.lower() not in PROMPT_FORMATS:
        raise PromptFileError(f"{path}: unknown prompt file type; use one of {', '.join(PROMPT_FORMATS)}")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")  # spreadsheet programs often write a byte-order mark
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise PromptFileError(f"{path}:{line}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    reader = {".txt": _txt_rows, ".csv": _csv_rows, ".jsonl": _jsonl_rows}[path.suffix.lower()]
    rows = []
    for line, prompt, fields in reader(path, text):
        rows.append((prompt, _check_fields(path, line, prompt, fields)))
    if not rows:
        raise PromptFileError(f"{path}: no prompts in the file")
    return rows


def _txt_rows(path, text) -> Iterator[tuple[int, str, dict]]:
    for line, prompt in enumerate(re.split("\r\n|\r|\n", text), 1):  # any mix of Unix, Windows, old Mac
        if prompt.strip():  # blank lines separate nothing and are skipped
            yield line, prompt.strip(), {}


def _csv_rows(path, text) -> Iterator[tuple[int, str, dict]]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        columns = reader.fieldnames or []
    except csv.Error as exc:
        raise PromptFileError(f"{path}:{reader.line_num}: bad CSV ({exc})") from None
    if "prompt" not in columns:
        shown = ", ".join(c if c.isprintable() else repr(c) for c in columns)
        raise PromptFileError(f"{path}:1: no 'prompt' column (columns: {_cut(shown) or 'none'})")
    try:
        for row in reader:
            if None in row or None in row.values():  # DictReader's marks of too many or too few values
                raise PromptFileError(f"{path}:{reader.line_num}: the row's number of values differs from "
                                      f"the header's {len(columns)} columns")
            fields = {k: v for k, v in row.items() if k != "prompt"}
            yield reader.line_num, row["prompt"], fields
    except csv.Error as exc:
        raise PromptFileError(f"{path}:{reader.line_num}: bad CSV ({exc})") from None


def _jsonl_rows(path, text) -> Iterator[tuple[int, str, dict]]:
    # Lines end at "\n" only: str.splitlines would also split at U+2028, which a JSON string may hold.
    for line, content in enumerate(text.split("\n"), 1):
        if not content.strip():
            continue
        try:
            obj = json.loads(content)
        except json.JSONDecodeError as exc:
            raise PromptFileError(f"{path}:{line}: not valid JSON ({exc.msg} at column {exc.colno})") from None
        except RecursionError:
            raise PromptFileError(f"{path}:{line}: JSON nested too deeply") from None
        if not isinstance(obj, dict) or "prompt" not in obj:
            raise PromptFileError(f'{path}:{line}: expected a JSON object with a "prompt" field')
        fields = {k: v for k, v in obj.items() if k != "prompt"}
        yield line, obj["prompt"], fields


def _check_fields(path, line, prompt, fields) -> dict:
    if not isinstance(prompt, str) or not prompt.strip():
        raise PromptFileError(f"{path}:{line}: the prompt must be a non-empty string, got {_short(prompt)}")
    if "\0" in prompt:
        raise PromptFileError(f"{path}:{line}: the prompt holds a NUL character")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as exc:  # a lone surrogate, which JSON's \\uXXXX escapes can spell
        raise PromptFileError(f"{path}:{line}: the prompt holds {exc.object[exc.start]!r}, "
                              f"half of a UTF-16 pair, not text") from None
    seed = fields.get("seed")
    if isinstance(seed, str) and not seed.strip():  # an empty CSV cell: the derived seed
        seed = fields["seed"] = None
    if seed is not None and not _is_seed(seed):
        raise PromptFileError(f"{path}:{line}: seed must be an integer that torch takes, got {_short(seed)}")
    if "label" in fields and parse_label(fields["label"]) is None:
        raise PromptFileError(f"{path}:{line}: label must be one of {', '.join(LABELS)}, "
                              f"got {_short(fields['label'])}")
    return fields


def _is_seed(value) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        return False
    try:
        seed = int(value)  # also "-3" and " 7 "; not "1.5" or superscripts
    except ValueError:
        return False
    return SEED_RANGE[0] <= seed < SEED_RANGE[1]


def _short(value) -> str:
    """repr of a value from a prompt file, cut for a one-line message."""
    return _cut(repr(value))


def _cut(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def parse_label(value) -> bool | None:
    """True for unsafe, False for benign, None for anything else (bools and 1/0 from JSON count too)."""
    return LABELS.get(str(int(value)) if isinstance(value, (bool, int)) else str(value).strip().lower())


# ------------------------------------------------------------------------------------------------
# Settings and the run manifest
OPTIONAL_SETTINGS = ("height", "width", "negative_prompt")  # left out of a manifest when unset


@dataclass(frozen=True)
class JobSettings:
    """Everything that decides a job's images; a resumed job must match it exactly."""

    model: str
    method: object  # a method object of spguard.methods
    steps: int | None
    guidance_scale: float | None
    seed: int
    # Batched convolutions are not bit-identical to unbatched ones, so the grouping of prompts into batches
    # is part of what decides the images.
    batch_size: int
    with_baseline: bool = False
    masks: bool = False
    height: int | None = None
    width: int | None = None
    negative_prompt: str | None = None  # the unconditional text of the method and of its CFG baseline

    def __post_init__(self):
        # What the model decides (the most steps, image sizes) is checked by run_job once it is loaded.
        if not (is_integer(self.batch_size) and self.batch_size >= 1):
            raise ValueError(f"batch size must be an integer of at least 1, got {self.batch_size!r}")
        if self.steps is not None and not (is_integer(self.steps) and self.steps >= 1):
            raise ValueError(f"steps must be at least 1, got {self.steps!r}")
        if self.guidance_scale is not None:
            check_finite("guidance scale", self.guidance_scale, minimum=0)
        if not (is_integer(self.seed) and SEED_RANGE[0] <= self.seed < SEED_RANGE[1]):
            raise ValueError(f"seed must be an integer from {SEED_RANGE[0]} to {SEED_RANGE[1] - 1}, got {self.seed!r}")

    def seed_of(self, record: PromptRecord) -> int:
        return record.seed if record.seed is not None else self.seed + record.index

    def to_dict(self) -> dict:
        method = {"name": type(self.method).__name__, **dataclasses.asdict(self.method)}
        settings = dataclasses.asdict(self)
        for unset in [k for k in OPTIONAL_SETTINGS if settings[k] is None]:  # as manifests without them say
            del settings[unset]
        return json.loads(json.dumps({**settings, "method": method}))


def manifest(records: list[PromptRecord], settings: JobSettings) -> dict:
    prompts = json.dumps([dataclasses.asdict(r) for r in records], sort_keys=True)
    return {"version": MANIFEST_VERSION, "num_prompts": len(records),
            "prompts_sha256": hashlib.sha256(prompts.encode()).hexdigest(),
            "settings": settings.to_dict()}


def check_output_folder(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ResumeError(f"--out {out} is a file, not a folder; name a folder (it is created if missing)")


def make_output_folder(out: Path) -> None:
    check_output_folder(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise WriteError(f"cannot create the folder {out}: {exc.strerror or exc}") from None


@contextlib.contextmanager
def output_lock(out: Path) -> Iterator[None]:
    """Hold the folder's lock file (LOCK, holding this process's id) while a job writes there.

    The lock is the kernel's flock on that file, taken atomically and released when the process ends
    however it ends; the file of a killed job stays behind, unlocked, and the next job takes it over.
    """
    import fcntl

    path = out / LOCK
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise WriteError(f"cannot write {path}: {exc.strerror or exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "a starting job"
            os.close(fd)
            raise ResumeError(f"{out} is being written by another job ({holder}); wait for it to end, "
                              f"or use another --out folder") from None
        with contextlib.suppress(FileNotFoundError):
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break  # else the holder before us removed the file after we opened it: try the new one
        os.close(fd)
    try:
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"process {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        except OSError as exc:
            raise WriteError(f"cannot write {path}: {exc.strerror or exc}") from None
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # before closing: a job that opens the file now finds it gone and tries anew
        os.close(fd)


def prepare_output(out: Path, expected: dict) -> None:
    """Check (or write) the manifest of the output folder and clear temporary files of a killed run
    (under the folder's lock: another live job's temporary files are not leftovers)."""
    path = out / MANIFEST
    if path.is_file():
        found = json.loads(path.read_text())
        if found != expected:
            raise ResumeError(f"{out} holds a different job ({_difference(found, expected)}); "
                              f"use another --out folder, or delete {out} to start over")
    else:
        _write_atomic(path, json.dumps(expected, indent=1).encode())
    for leftover in out.glob("*" + TMP_SUFFIX):
        leftover.unlink()


def _difference(found: dict, expected: dict) -> str:
    if found.get("prompts_sha256") != expected["prompts_sha256"]:
        return f"other prompts: {found.get('num_prompts')} there, {expected['num_prompts']} now"
    old, new = found.get("settings", {}), expected["settings"]
    changed = [k for k in new if old.get(k) != new[k]]
    return "other settings: " + ", ".join(f"{k} was {old.get(k)!r}, now {new[k]!r}" for k in changed)


# ------------------------------------------------------------------------------------------------
# Files
def _stem(index: int) -> str:
    return f"{index:06d}"


def report_path(out: Path, index: int) -> Path:
    return out / f"{_stem(index)}.json"


def _write_atomic(path: Path, data: bytes) -> None:
    # The temporary file sits in the same folder so that os.replace is a rename within one file system,
    # which is atomic. fsync before the rename: after a power cut the name must not point at an empty file.
    # A failed write (ENOSPC, EIO, EACCES) removes its temporary file and leaves the final name untouched.
    tmp = path.with_name(path.name + TMP_SUFFIX)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise WriteError(f"cannot write {path}: {exc.strerror or exc}") from None


def _png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def to_pixels(image: np.ndarray) -> np.ndarray:
    """An H×W×3 float image in [0, 1] as uint8 pixels, rounded as the pipeline's PIL output is."""
    return (image * 255).round().astype("uint8")


def mask_overlay(pixels: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The image with a mask (latent resolution, any non-negative scale) overlaid in OVERLAY_COLOR."""
    peak = mask.max()
    weight = mask / peak if peak > 0 else mask
    scale = pixels.shape[0] // mask.shape[0], pixels.shape[1] // mask.shape[1]
    alpha = OVERLAY_ALPHA * np.kron(weight, np.ones(scale))[..., None]  # nearest upsampling to the image
    return (pixels * (1 - alpha) + OVERLAY_COLOR * alpha).round().astype("uint8")


def load_reports(out: Path) -> list[dict]:
    """The reports of the prompts done so far in an output folder, in index order."""
    if not out.is_dir():
        raise FileNotFoundError(f"output folder not found: {out}")
    reports = sorted((json.loads(p.read_text()) for p in out.glob("*.json") if p.stem.isdigit()),
                     key=lambda r: r["index"])
    if not reports:
        raise FileNotFoundError(f"{out} holds no reports: run `spguard generate --out {out}` first")
    return reports


# ------------------------------------------------------------------------------------------------
# Drawing
@dataclass
class _Drawn:
    pixels: np.ndarray | None = None
    cfg_pixels: np.ndarray | None = None
    report: dict | None = None
    error: str | None = None


def _draw(pipe, records: list[PromptRecord], settings: JobSettings) -> list[_Drawn]:
    """Images and reports of a batch. If the batch fails, each prompt is drawn alone to find the culprit."""
    try:
        return _draw_batch(pipe, records, settings)
    except Exception as exc:  # noqa: BLE001 - any failure of one prompt must not stop the job
        if len(records) == 1:
            return [_Drawn(error=f"{type(exc).__name__}: {exc}")]
        return [drawn for record in records for drawn in _draw(pipe, [record], settings)]


def _draw_batch(pipe, records, settings) -> list[_Drawn]:
    kwargs = dict(prompt=[r.prompt for r in records], num_inference_steps=settings.steps,
                  guidance_scale=settings.guidance_scale, seed=[settings.seed_of(r) for r in records],
                  height=settings.height, width=settings.width, negative_prompt=settings.negative_prompt,
                  output_type="np")
    out = pipe(**kwargs, method=settings.method, report_masks=settings.masks)
    cfg_images = pipe(**kwargs, method="cfg").images if settings.with_baseline else [None] * len(records)
    drawn = []
    for image, cfg_image, report in zip(out.images, cfg_images, out.reports):
        if not np.isfinite(image).all() or (cfg_image is not None and not np.isfinite(cfg_image).all()):
            drawn.append(_Drawn(error="the image has NaN or infinite values"))
            continue
        drawn.append(_Drawn(to_pixels(image), None if cfg_image is None else to_pixels(cfg_image),
                            report.to_dict()))
    return drawn


def _save(out: Path, record: PromptRecord, settings: JobSettings, drawn: _Drawn) -> dict:
    """Write one prompt's files, its report last (see the module docstring), and return the report."""
    stem = _stem(record.index)
    report = {"index": record.index, "prompt": record.prompt, "seed": settings.seed_of(record),
              "fields": record.fields, "method": settings.method.name, "error": drawn.error,
              "image": None, "cfg_image": None, "mask_image": None}
    files = {}
    if drawn.error is None:
        snapshots = drawn.report.pop("mask_snapshots") or {}
        report.update(drawn.report)
        report["image"] = f"{stem}.png"
        files[report["image"]] = _png_bytes(drawn.pixels)
        if drawn.cfg_pixels is not None:
            report["cfg_image"] = f"{stem}.cfg.png"
            files[report["cfg_image"]] = _png_bytes(drawn.cfg_pixels)
        last = snapshots[max(snapshots)] if snapshots else None
        if last is not None:
            report["mask_image"] = f"{stem}.mask.png"
            files[report["mask_image"]] = _png_bytes(mask_overlay(drawn.pixels, np.asarray(last)))
    files[report_path(out, record.index).name] = json.dumps(report).encode()
    written = []
    try:
        for name, data in files.items():  # the report last
            _write_atomic(out / name, data)
            written.append(out / name)
    except WriteError:
        for path in written:  # a prompt is all its files or none
            with contextlib.suppress(OSError):
                path.unlink()
        raise
    return report


# ------------------------------------------------------------------------------------------------
# Processes
@contextlib.contextmanager
def distributed(device: str | None) -> Iterator[tuple[int, int, str]]:
    """(rank, world size, device) of this process; joins the torch.distributed group under torchrun."""
    import torch

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = torch.cuda.is_available() and (device is None or device.startswith("cuda"))
    if world_size == 1:
        yield 0, 1, device or ("cuda" if use_cuda else "cpu")
        return
    import torch.distributed as dist

    if use_cuda:
        local_rank = int(os.environ["LOCAL_RANK"])
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    dist.init_process_group("nccl" if use_cuda else "gloo")
    try:
        yield dist.get_rank(), world_size, device or "cpu"
    finally:
        dist.destroy_process_group()


def _broadcast_error(rank: int, world_size: int, error: Exception | None) -> Exception | None:
    """Rank 0's verdict on the output folder, sent to every rank; doubles as a barrier."""
    if world_size == 1:
        return error
    import torch.distributed as dist

    message = [error if rank == 0 else None]
    dist.broadcast_object_list(message, src=0)
    return message[0]


def _barrier(world_size: int) -> None:
    if world_size > 1:
        import torch.distributed as dist

        dist.barrier()


def _warn_truncated(records: list[PromptRecord], pipe) -> None:
    """One line per prompt longer than the text encoder takes, by its index in the job (the pipeline's
    own warning, given once per call and by the prompt's place in the batch, is turned off)."""
    from .pipeline import TRUNCATION_WARNING

    pipe.warn_truncation = False
    for record in records:
        try:
            dropped = pipe.dropped_words([record.prompt])[0]
        except Exception:  # noqa: BLE001 - a prompt the tokenizer cannot take fails when drawn, in its report
            continue
        if dropped:
            message = TRUNCATION_WARNING % (record.index, pipe.tokenizer.model_max_length, dropped)
            print(f"spguard: warning: {message}", file=sys.stderr)


class _Once(logging.Filter):
    def __init__(self):
        super().__init__()
        self.seen = set()

    def filter(self, record):
        key = (record.name, record.levelno, record.getMessage())
        shown = key not in self.seen
        self.seen.add(key)
        return shown


@contextlib.contextmanager
def warnings_once() -> Iterator[None]:
    """Each distinct library warning (diffusers' and transformers' logs, Python warnings) shown once while
    a job runs, however many batches repeat it."""
    filters = {h: _Once() for name in ("diffusers", "transformers") for h in logging.getLogger(name).handlers}
    for handler, once in filters.items():
        handler.addFilter(once)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("once")
            yield
    finally:
        for handler, once in filters.items():
            handler.removeFilter(once)


@dataclass
class JobSummary:
    total: int
    guided: int
    failed: int


def run_job(records: list[PromptRecord], settings: JobSettings, out: Path,
            load_pipeline: Callable[[str], object], device: str | None = None,
            progress: bool = True) -> JobSummary | None:
    """Draw every prompt not yet done into `out`; under torchrun each rank takes every world_size-th batch.

    Returns the summary on rank 0 and None on the other ranks.
    """
    from tqdm.auto import tqdm

    check_output_folder(out)
    with distributed(device) as (rank, world_size, device), contextlib.ExitStack() as rank0_lock, warnings_once():
        # Load first: a model that cannot be loaded must fail before the output folder is touched.
        pipe = load_pipeline(device)
        pipe.set_progress_bar_config(disable=True)
        pipe.check_settings(settings.steps, settings.guidance_scale)  # not each prompt "failing" on them
        error = None
        if rank == 0:  # rank 0 holds the folder's lock for all ranks of the job
            try:
                make_output_folder(out)
                rank0_lock.enter_context(output_lock(out))
                prepare_output(out, manifest(records, settings))
            except (ResumeError, WriteError) as exc:
                error = exc
        error = _broadcast_error(rank, world_size, error)
        if error is not None:
            raise error

        # Batches are cut from the whole prompt list, not from a rank's share or from what is left, so
        # every image is drawn in the same batch however many processes run and however often it resumes.
        batches = [records[i : i + settings.batch_size] for i in range(0, len(records), settings.batch_size)]
        mine = batches[rank::world_size]
        done = {r.index for b in mine for r in b if report_path(out, r.index).exists()}
        todo = [b for b in mine if any(r.index not in done for r in b)]
        _warn_truncated([r for b in todo for r in b if r.index not in done], pipe)
        drawn_count = guided = 0
        with tqdm(total=sum(len(b) for b in mine), initial=len(done), unit="img", desc="generate",
                  disable=not progress or rank != 0, file=sys.stderr) as bar:
            for batch in todo:
                for record, drawn in zip(batch, _draw(pipe, batch, settings)):
                    if record.index in done:
                        continue  # finished before a kill: its files are complete and stay as they are
                    report = _save(out, record, settings, drawn)
                    drawn_count += 1
                    guided += bool(report.get("guided"))
                    bar.update()
                    bar.set_postfix(guided=f"{guided / drawn_count:.0%}")
        _barrier(world_size)
        if rank != 0:
            return None
        reports = load_reports(out)
        _write_atomic(out / REPORTS, "".join(json.dumps(r) + "\n" for r in reports).encode())
        return JobSummary(total=len(reports), guided=sum(bool(r.get("guided")) for r in reports),
                          failed=sum(r["error"] is not None for r in reports))
