"""Loads the compiled C++/CUDA ops (spguard._C, spguard._C_cuda) and gives them fake implementations.

A missing or broken extension is recorded, not raised: the package then runs on the torch reference.
"""

from __future__ import annotations

import importlib

import torch

from . import reference

#: Why each extension is or is not usable, filled in at import ("" when loaded).
load_errors: dict[str, str] = {}


def _load(module: str) -> bool:
    try:
        importlib.import_module(module)
    except (ImportError, OSError) as exc:  # not built, or built against another torch
        load_errors[module] = f"{type(exc).__name__}: {exc}".splitlines()[0]
        return False
    load_errors[module] = ""
    return True


cpp_loaded = _load("spguard._C")
# The CUDA kernels only implement the schemas that spguard._C defines.
cuda_loaded = cpp_loaded and torch.cuda.is_available() and _load("spguard._C_cuda")
if cpp_loaded and not torch.cuda.is_available():
    load_errors["spguard._C_cuda"] = "no CUDA device"


def _register_fakes() -> None:
    """Shapes and dtypes of the outputs, so torch.compile traces the ops without running them."""

    @torch.library.register_fake("spguard::cross_attention_aggregate")
    def _(q, k, token_mask):
        return q.new_empty((q.shape[0], q.shape[2]), dtype=torch.float32)

    @torch.library.register_fake("spguard::phase1_step")
    def _(e_u, e_p, e_s, guidance_scale):
        B, N = e_s.shape[:2]
        f32 = dict(dtype=torch.float32, device=e_u.device)
        return (torch.empty_like(e_u, memory_format=torch.contiguous_format), torch.empty((B, N), **f32),
                torch.empty((B,), **f32), torch.empty((B, N), **f32))

    @torch.library.register_fake("spguard::phase2_step")
    def _(e_u, e_p, e_s, strength, guidance_scale, q, attention):
        return (torch.empty_like(e_u, memory_format=torch.contiguous_format),
                torch.empty_like(e_u, dtype=torch.float32, memory_format=torch.contiguous_format))


if cpp_loaded:
    _register_fakes()

__all__ = ["cpp_loaded", "cuda_loaded", "load_errors", "reference"]
