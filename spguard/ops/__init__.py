"""The fused guidance operations, dispatched to the chosen backend (reference: spguard.ops.reference).

Backends: "torch" (the reference, always there), "cpp" (spguard._C, CPU tensors), "cuda" (spguard._C_cuda,
CUDA tensors), "triton" (spguard.kernels, CUDA tensors; CPU tensors only under TRITON_INTERPRET=1, for
tests). SPGUARD_BACKEND=auto|torch|cpp|cuda|triton chooses, read at each call; "auto" takes the fastest
available for the inputs' device and dtype. A backend that cannot take the inputs falls back to "torch".
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
from torch import Tensor

from . import _extension, reference
from .reference import quantile_index

BACKENDS = ("torch", "cpp", "cuda", "triton")
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Fastest first, per device type. On a GPU the CUDA kernels fuse the quantile select; Triton's calls
# torch.kthvalue between its two kernels.
_PREFERENCE = {"cpu": ("cpp", "torch"), "cuda": ("cuda", "triton", "torch")}


def _load_triton() -> tuple[object | None, str]:
    try:
        import triton  # noqa: F401
    except ImportError:
        return None, "triton is not installed"
    try:
        from spguard import kernels
    except Exception as exc:  # noqa: BLE001 - a broken triton must not break the package
        return None, f"importing spguard.kernels failed: {type(exc).__name__}: {exc}".splitlines()[0]
    return kernels, ""


_triton_kernels, _triton_error = _load_triton()


def _triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


class BackendInfo(NamedTuple):
    name: str
    available: bool
    detail: str  # what it runs on, or why it is not available

    def __str__(self) -> str:
        return f"{self.name:7s} {'yes' if self.available else 'no ':3s}  {self.detail}"


def backends() -> list[BackendInfo]:
    """Every backend, whether it is usable here, and on what (or why not)."""
    cuda = torch.cuda.is_available()
    info = [BackendInfo("torch", True, "plain PyTorch reference, any device")]
    if _extension.cpp_loaded:
        info.append(BackendInfo("cpp", True, "spguard._C, CPU tensors"))
    else:
        info.append(BackendInfo("cpp", False, f"spguard._C not loaded ({_extension.load_errors['spguard._C']})"))
    if _extension.cuda_loaded:
        info.append(BackendInfo("cuda", True, "spguard._C_cuda, CUDA tensors"))
    else:
        reason = _extension.load_errors.get("spguard._C_cuda") or "spguard._C is not loaded"
        info.append(BackendInfo("cuda", False, f"spguard._C_cuda not loaded ({reason})"))
    if _triton_kernels is None:
        info.append(BackendInfo("triton", False, _triton_error))
    elif cuda:
        info.append(BackendInfo("triton", True, "spguard.kernels, CUDA tensors"))
    elif _triton_interpreted():
        info.append(BackendInfo("triton", True, "spguard.kernels under TRITON_INTERPRET=1 (CPU, slow: tests only)"))
    else:
        info.append(BackendInfo("triton", False, "no CUDA device (TRITON_INTERPRET=1 runs it on the CPU, slowly)"))
    return info


def _usable(name: str, device: torch.device, dtype: torch.dtype) -> bool:
    if name == "torch":
        return True
    if dtype not in KERNEL_DTYPES:
        return False
    if name == "cpp":
        return _extension.cpp_loaded and device.type == "cpu"
    if name == "cuda":
        return _extension.cuda_loaded and device.type == "cuda"
    if name == "triton":
        return _triton_kernels is not None and (device.type == "cuda" or _triton_interpreted())
    raise ValueError(f"unknown spguard backend {name!r}; choose from auto, {', '.join(BACKENDS)}")


def resolve_backend(device: torch.device, dtype: torch.dtype) -> str:
    """The backend that SPGUARD_BACKEND selects for inputs on `device` of `dtype`."""
    wanted = os.environ.get("SPGUARD_BACKEND", "auto").strip().lower() or "auto"
    if wanted != "auto":
        return wanted if _usable(wanted, device, dtype) else "torch"
    for name in _PREFERENCE.get(device.type, ("torch",)):
        if _usable(name, device, dtype):
            return name
    return "torch"


def _same_dtype(*tensors: Tensor) -> torch.dtype | None:
    dtypes = {t.dtype for t in tensors}
    return dtypes.pop() if len(dtypes) == 1 else None


def cross_attention_aggregate(q: Tensor, k: Tensor, token_mask: Tensor) -> Tensor:
    """A (B, L) fp32: attention of q on the masked tokens of k, mean over heads
    (docs/design.md, "The fused operations", op 1)."""
    dtype = _same_dtype(q, k)
    backend = resolve_backend(q.device, dtype) if dtype is not None else "torch"
    if backend == "cpp" or backend == "cuda":
        return torch.ops.spguard.cross_attention_aggregate(q, k, token_mask)
    if backend == "triton":
        return torch.ops.spguard.cross_attention_aggregate_triton(q, k, token_mask)
    return reference.cross_attention_aggregate(q, k, token_mask)


def phase1_step(e_u: Tensor, e_p: Tensor, e_s: Tensor, guidance_scale: float):
    """(eps, dot(d_p, d_s) (B, N), |d_p|^2 (B,), |d_s|^2 (B, N)): SP-Guard phase 1
    (docs/design.md, "The fused operations", op 2)."""
    dtype = _same_dtype(e_u, e_p, e_s)
    backend = resolve_backend(e_u.device, dtype) if dtype is not None else "torch"
    if backend == "cpp" or backend == "cuda":
        return torch.ops.spguard.phase1_step(e_u, e_p, e_s, float(guidance_scale))
    if backend == "triton":
        return torch.ops.spguard.phase1_step_triton(e_u, e_p, e_s, float(guidance_scale))
    return reference.phase1_step(e_u, e_p, e_s, guidance_scale)


def phase2_step(e_u: Tensor, e_p: Tensor, e_s: Tensor, strength: Tensor, guidance_scale: float, q: float,
                attention: Tensor | None = None):
    """(eps, M): SP-Guard phase 2 with the noise mask, or the attention mask when given
    (docs/design.md, "The fused operations", op 3)."""
    dtype = _same_dtype(e_u, e_p, e_s)
    backend = resolve_backend(e_u.device, dtype) if dtype is not None else "torch"
    if backend == "cpp" or backend == "cuda":
        return torch.ops.spguard.phase2_step(e_u, e_p, e_s, strength, float(guidance_scale), float(q), attention)
    if backend == "triton":
        return torch.ops.spguard.phase2_step_triton(e_u, e_p, e_s, strength, float(guidance_scale), float(q),
                                                    attention)
    return reference.phase2_step(e_u, e_p, e_s, strength, guidance_scale, q, attention)


__all__ = [
    "BACKENDS",
    "BackendInfo",
    "backends",
    "cross_attention_aggregate",
    "phase1_step",
    "phase2_step",
    "quantile_index",
    "resolve_backend",
]
