"""The fused guidance operations, dispatched to a backend (reference: spguard.ops.reference).

Backends: "torch" (the reference: any inputs), "cpp" (spguard._C, CPU tensors), "cuda" (spguard._C_cuda,
CUDA tensors), "triton" (spguard.kernels, CUDA tensors; CPU tensors only under TRITON_INTERPRET=1, for tests).
`TABLE` holds, per op, each backend's kernel and its constraints: the backend is loaded, the inputs are on
its device, they pass the op's checks (spguard.ops.schemas: shapes, one kernel dtype), and any limit of that
kernel. "auto" takes the fastest backend for the inputs' device whose constraints hold, so it runs wherever
the reference runs; a backend named explicitly that cannot take the inputs raises a one-line ValueError.
The choice is SPGUARD_BACKEND=auto|torch|cpp|cuda|triton, read once at import, or `use_backend(name)`
around a block of code.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import NamedTuple

import torch
from torch import Tensor

from . import _extension, reference, schemas
from .reference import quantile_index
from .schemas import KERNEL_DTYPES

BACKENDS = ("torch", "cpp", "cuda", "triton")
# What "auto" tries, fastest first, per device type. On a GPU the CUDA kernels fuse the quantile select;
# Triton's calls torch.kthvalue between its two kernels. Triton on the CPU (its interpreter) is for tests.
_AUTO_ORDER = {"cpu": ("cpp", "torch"), "cuda": ("cuda", "triton", "torch")}
_TRITON_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


class BackendInfo(NamedTuple):
    name: str
    available: bool
    detail: str  # what it runs on, or why it is not available

    def __str__(self) -> str:
        return f"{self.name:7s} {'yes' if self.available else 'no ':3s}  {self.detail}"


def backends() -> list[BackendInfo]:
    """Every backend, whether it is usable here, and on what (or why not)."""
    errors = _extension.load_errors
    info = [BackendInfo("torch", True, "plain PyTorch reference, any device")]
    if _extension.cpp_loaded:
        info.append(BackendInfo("cpp", True, "spguard._C, CPU tensors"))
    else:
        info.append(BackendInfo("cpp", False, f"spguard._C not loaded ({errors['spguard._C']})"))
    if _extension.cuda_loaded:
        info.append(BackendInfo("cuda", True, "spguard._C_cuda, CUDA tensors"))
    else:
        info.append(BackendInfo("cuda", False, f"spguard._C_cuda not loaded ({errors['spguard._C_cuda']})"))
    if _extension.triton_kernels is None:
        info.append(BackendInfo("triton", False, errors["spguard.kernels"]))
    elif torch.cuda.is_available():
        info.append(BackendInfo("triton", True, "spguard.kernels, CUDA tensors"))
    elif _TRITON_INTERPRETED:
        info.append(BackendInfo("triton", True, "spguard.kernels under TRITON_INTERPRET=1 (CPU, slow: tests only)"))
    else:
        info.append(BackendInfo("triton", False, "no CUDA device (TRITON_INTERPRET=1 runs it on the CPU, slowly)"))
    return info


_INFO = {b.name: b for b in backends()}
#: The device types each backend's tensors may be on (None: any).
_DEVICES = {"torch": None, "cpp": ("cpu",), "cuda": ("cuda",),
            "triton": ("cuda", "cpu") if _TRITON_INTERPRETED else ("cuda",)}


class Kernel(NamedTuple):
    """One backend's implementation of an op; `limit` names inputs it cannot take beyond the op's checks."""

    run: Callable
    limit: Callable[..., str | None] | None = None


def _triton(name: str) -> Callable:
    return getattr(torch.ops.spguard, f"{name}_triton") if _extension.triton_kernels is not None else None


def _triton_head_dim(q: Tensor, k: Tensor, token_mask: Tensor) -> str | None:
    limit = _extension.triton_kernels.CROSS_ATTENTION_MAX_HEAD_DIM
    return None if q.shape[-1] <= limit else f"head_dim {q.shape[-1]} exceeds the Triton kernel's {limit}"


#: Per op, its backends' kernels. The C++ and CUDA kernels share one op, torch's dispatcher picks by device.
TABLE: dict[str, dict[str, Kernel]] = {
    "cross_attention_aggregate": {
        "cpp": Kernel(torch.ops.spguard.cross_attention_aggregate),
        "cuda": Kernel(torch.ops.spguard.cross_attention_aggregate),
        "triton": Kernel(_triton("cross_attention_aggregate"), _triton_head_dim),
        "torch": Kernel(reference.cross_attention_aggregate),
    },
    "phase1_step": {
        "cpp": Kernel(torch.ops.spguard.phase1_step),
        "cuda": Kernel(torch.ops.spguard.phase1_step),
        # The Triton op packs its statistics in one tensor; spguard.kernels.phase1_step splits them.
        "triton": Kernel(getattr(_extension.triton_kernels, "phase1_step", None)),
        "torch": Kernel(reference.phase1_step),
    },
    "phase2_step": {
        "cpp": Kernel(torch.ops.spguard.phase2_step),
        "cuda": Kernel(torch.ops.spguard.phase2_step),
        "triton": Kernel(_triton("phase2_step")),
        "torch": Kernel(reference.phase2_step),
    },
}


def _checked_name(name: str) -> str:
    name = name.strip().lower() or "auto"
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"unknown spguard backend {name!r}; choose from auto, {', '.join(BACKENDS)}")
    return name


_selected = _checked_name(os.environ.get("SPGUARD_BACKEND", "auto"))  # read once; use_backend changes it


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the ops inside the block on backend `name` ("auto" or one of BACKENDS), then restore the choice."""
    global _selected
    previous, _selected = _selected, _checked_name(name)
    try:
        yield
    finally:
        _selected = previous


def selected_backend() -> str:
    """The current choice: "auto" or a backend name (SPGUARD_BACKEND, or the innermost use_backend)."""
    return _selected


def _unsupported(op: str, backend: str, args: tuple) -> str | None:
    """Why `backend` cannot run `op` on `args`, or None when it can."""
    if backend == "torch":
        return None
    if not _INFO[backend].available:
        return f"the backend is not available: {_INFO[backend].detail}"
    device = args[0].device
    if device.type not in _DEVICES[backend]:
        return f"it takes {' or '.join(_DEVICES[backend])} tensors, not {device.type}"
    limit = TABLE[op][backend].limit
    return schemas.PROBLEMS[op](*args) or (limit(*args) if limit is not None else None)


def backend_for(op: str, *args) -> str:
    """The backend that runs `op` on `args` under the current choice; ValueError when a backend named
    explicitly cannot take them."""
    if _selected != "auto":
        reason = _unsupported(op, _selected, args)
        if reason is not None:
            raise ValueError(f"spguard backend {_selected!r} cannot run {op} on these inputs: {reason}")
        return _selected
    for backend in _AUTO_ORDER.get(args[0].device.type, ("torch",)):
        if _unsupported(op, backend, args) is None:
            return backend
    return "torch"


def _dispatch(op: str, *args):
    return TABLE[op][backend_for(op, *args)].run(*args)


def cross_attention_aggregate(q: Tensor, k: Tensor, token_mask: Tensor) -> Tensor:
    """A (B, L) fp32: attention of q on the masked tokens of k, mean over heads
    (docs/design.md, "The fused operations", op 1)."""
    return _dispatch("cross_attention_aggregate", q, k, token_mask)


def phase1_step(e_u: Tensor, e_p: Tensor, e_s: Tensor, guidance_scale: float):
    """(eps, dot(d_p, d_s) (B, N), |d_p|^2 (B,), |d_s|^2 (B, N)): SP-Guard phase 1
    (docs/design.md, "The fused operations", op 2)."""
    return _dispatch("phase1_step", e_u, e_p, e_s, float(guidance_scale))


def phase2_step(e_u: Tensor, e_p: Tensor, e_s: Tensor, strength: Tensor, guidance_scale: float, q: float,
                pixel_scores: Tensor | None = None):
    """(eps, M): SP-Guard phase 2 with the noise mask, or with the region taken on a per-pixel score map
    when given (the attention or the aligned mask; docs/design.md, "The fused operations", op 3)."""
    return _dispatch("phase2_step", e_u, e_p, e_s, strength, float(guidance_scale), float(q), pixel_scores)


__all__ = [
    "BACKENDS",
    "KERNEL_DTYPES",
    "TABLE",
    "BackendInfo",
    "Kernel",
    "backend_for",
    "backends",
    "cross_attention_aggregate",
    "phase1_step",
    "phase2_step",
    "quantile_index",
    "selected_backend",
    "use_backend",
]
