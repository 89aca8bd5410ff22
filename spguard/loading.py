"""Loading a diffusers-format model folder from local disk: never the network, one-line errors.

`load_components(path, names)` loads the components that the folder's model_index.json names (unet,
text_encoder, tokenizer, vae, scheduler; SDXL's text_encoder_2 and tokenizer_2 the same way), each with
`local_files_only=True` whatever the environment says, and checks that they fit one another. Anything
wrong (a missing or unreadable folder or file, truncated or corrupt weights, a class no library has,
components of mismatched widths) raises ModelLoadError, whose message is one line naming the folder or
file and what is wrong.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path


INDEX_FILE = "model_index.json"
# The libraries whose classes model_index.json may name: diffusers' own two and this package (its
# pixel-unshuffle autoencoder). A folder cannot make the loader import anything else.
LIBRARIES = ("diffusers", "transformers", "spguard")


class ModelLoadError(OSError):
    """A model folder that cannot be loaded; the message is one line naming the folder or file."""


def load_components(path, names: Sequence[str], optional: Sequence[str] = ()) -> dict:
    """The components `names` of the model folder at `path`, as model_index.json names their classes, and
    those of `optional` that it names (SDXL's second text encoder)."""
    path = Path(path)
    if not path.is_dir():
        raise ModelLoadError(f"model folder not found: {path}")
    index = read_index(path)
    components = {}
    present = [n for n in optional if isinstance(index.get(n), list) and index[n][0] is not None]
    for name in list(names) + present:
        entry = index.get(name)
        if not (isinstance(entry, list) and len(entry) == 2 and all(isinstance(x, str) for x in entry)):
            raise ModelLoadError(f"{path / INDEX_FILE}: names no {name} (expected \"{name}\": [library, class])")
        components[name] = load_component(path / name, *entry)
    check_fit(path, components)
    return components


def read_index(path: Path) -> dict:
    index_file = path / INDEX_FILE
    if not index_file.is_file():
        raise ModelLoadError(f"{path} is not a diffusers model folder: it has no {INDEX_FILE}")
    try:
        index = json.loads(index_file.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ModelLoadError(f"{index_file}: cannot read it ({_reason(exc)})") from None
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError both are
        raise ModelLoadError(f"{index_file}: not valid JSON ({exc})") from None
    if not isinstance(index, dict):
        raise ModelLoadError(f"{index_file}: expected a JSON object")
    return index


def load_component(folder: Path, library: str, class_name: str):
    """One component from its sub-folder, with local files only."""
    cls = _component_class(folder, library, class_name)
    if not folder.exists():
        raise ModelLoadError(f"{folder}: missing: {INDEX_FILE} names a {library}.{class_name} here")
    if not folder.is_dir():
        raise ModelLoadError(f"{folder}: not a folder: {INDEX_FILE} names a {library}.{class_name} here")
    if not os.access(folder, os.R_OK | os.X_OK):
        raise ModelLoadError(f"{folder}: cannot read the folder (permission denied)")
    from diffusers.utils import is_accelerate_available

    _check_files(folder, cls)
    kwargs = {"local_files_only": True}
    if _is_model(cls):
        # With accelerate, diffusers builds the model on the meta device and loads the weights straight
        # into it; without, say so ourselves instead of diffusers' warning on every load.
        kwargs["low_cpu_mem_usage"] = is_accelerate_available()
    with _held_library_logs() as held:
        try:
            component = cls.from_pretrained(folder, **kwargs)
        except Exception as exc:  # noqa: BLE001 - every library's failure becomes the one line
            raise ModelLoadError(f"{folder}: cannot load the {library}.{class_name}: {_reason(exc)}") from None
        held.show()
    return component


def _check_files(folder: Path, cls) -> None:
    """What the libraries report badly: weights that are cut short or corrupt, tokenizers without files."""
    from safetensors import safe_open

    for file in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(file, "pt"):  # checks the header and that the tensors fill the file exactly
                pass
        except OSError as exc:
            raise ModelLoadError(f"{file}: cannot read it ({_reason(exc)})") from None
        except Exception as exc:  # noqa: BLE001 - SafetensorError has no public base class
            reason = str(exc).removeprefix("Error while deserializing header: ")
            raise ModelLoadError(f"{file}: truncated or corrupt weights ({reason})") from None
    names = getattr(cls, "vocab_files_names", None)  # a tokenizer's files; any one of them may suffice
    if names and not any((folder / name).is_file() for name in names.values()):
        raise ModelLoadError(f"{folder}: no tokenizer files (expected {' or '.join(names.values())})")


class _HeldLogs(logging.Handler):
    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []
        self.shown = False

    def emit(self, record):
        self.records.append(record)

    def show(self):
        self.shown = True


@contextlib.contextmanager
def _held_library_logs():
    """diffusers' and transformers' log records and progress bars during one load are held back: a load
    that fails says everything in its one line; after `show()` (a load that worked) they are shown."""
    from transformers.utils import logging as hf_logging

    held = _HeldLogs()
    loggers = [logging.getLogger(name) for name in ("diffusers", "transformers")]
    saved = [(lg, lg.handlers[:], lg.propagate) for lg in loggers]
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    for lg in loggers:
        lg.handlers, lg.propagate = [held], False
    try:
        yield held
    finally:
        for lg, handlers, propagate in saved:
            lg.handlers, lg.propagate = handlers, propagate
        if bars:
            hf_logging.enable_progress_bar()
        if held.shown:
            for record in held.records:
                logging.getLogger(record.name).handle(record)


def _component_class(folder: Path, library: str, class_name: str):
    where = f"{folder.parent / INDEX_FILE}: {folder.name} is {library}.{class_name}"
    if library.split(".")[0] not in LIBRARIES:
        raise ModelLoadError(f"{where}, but components can only come from {', '.join(LIBRARIES)}")
    try:
        module = importlib.import_module(library)
    except ImportError:
        raise ModelLoadError(f"{where}, but there is no module {library}") from None
    cls = getattr(module, class_name, None)
    if not (isinstance(cls, type) and hasattr(cls, "from_pretrained")):
        raise ModelLoadError(f"{where}, but {library} has no such loadable class")
    return cls


def _is_model(cls) -> bool:
    from diffusers import ModelMixin

    return issubclass(cls, ModelMixin)


def _reason(exc: BaseException) -> str:
    """The first line of an exception's message (libraries often add hints on further lines)."""
    if isinstance(exc, OSError) and exc.strerror:  # errno errors: "name: Permission denied"
        return f"{exc.filename}: {exc.strerror}" if exc.filename else exc.strerror
    text = str(exc)
    if "ignore_mismatched_sizes" in text:  # both libraries' words for weights of other shapes than the config's
        return f"its weights have other shapes than its config.json describes ({text.split('. If you')[0]})" \
            if "expected shape" in text else "its weights have other shapes than its config.json describes"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def check_fit(path: Path, c: dict) -> None:
    """Components that load one by one may still not fit together: check the widths they share."""
    unet, vae = c.get("unet"), c.get("vae")
    encoders = [c[name] for name in sorted(c) if name.startswith("text_encoder")]
    if unet is not None and encoders:
        # SD's UNet attends to the text encoder's hidden states; SDXL's to both encoders' concatenated.
        width = sum(e.config.hidden_size for e in encoders)
        if unet.config.cross_attention_dim != width:
            raise ModelLoadError(f"{path}: the unet attends to text of width {unet.config.cross_attention_dim} "
                                 f"but the text encoders give {width}")
    if unet is not None and vae is not None:
        latent = getattr(vae.config, "latent_channels", None) or getattr(vae, "latent_channels", None)
        if latent is not None and (unet.config.in_channels, unet.config.out_channels) != (latent, latent):
            raise ModelLoadError(f"{path}: the unet takes {unet.config.in_channels} and gives "
                                 f"{unet.config.out_channels} channels but the vae's latents have {latent}")
    for suffix in ("", "_2"):
        tokenizer, encoder = c.get("tokenizer" + suffix), c.get("text_encoder" + suffix)
        if tokenizer is None or encoder is None:
            continue
        if len(tokenizer) > encoder.config.vocab_size:
            raise ModelLoadError(f"{path}: tokenizer{suffix} has {len(tokenizer)} tokens but text_encoder{suffix} "
                                 f"embeds only {encoder.config.vocab_size}")
        if tokenizer.model_max_length > encoder.config.max_position_embeddings:
            raise ModelLoadError(f"{path}: tokenizer{suffix} makes {tokenizer.model_max_length} tokens but "
                                 f"text_encoder{suffix} has {encoder.config.max_position_embeddings} positions")
