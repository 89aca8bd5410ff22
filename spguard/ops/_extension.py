"""Loads the kernel backends: the compiled C++/CUDA libraries (spguard._C, spguard._C_cuda) and the Triton
kernels (spguard.kernels), after the op schemas they implement (spguard.ops.schemas).

A missing or broken backend is recorded, not raised: the package then runs on the torch reference.
"""

from __future__ import annotations

import importlib

import torch

from . import schemas  # noqa: F401 - defines torch.ops.spguard.* before any library registers kernels for them

#: Why each backend module is or is not usable, filled in at import ("" when loaded).
load_errors: dict[str, str] = {}


def _load(module: str):
    try:
        loaded = importlib.import_module(module)
    except (ImportError, OSError) as exc:  # not built, or built against another torch
        load_errors[module] = f"{type(exc).__name__}: {exc}".splitlines()[0]
        return None
    load_errors[module] = ""
    return loaded


cpp_loaded = _load("spguard._C") is not None
if torch.cuda.is_available():
    cuda_loaded = _load("spguard._C_cuda") is not None
else:
    cuda_loaded = False
    load_errors["spguard._C_cuda"] = "no CUDA device"


def _load_triton():
    try:
        import triton  # noqa: F401
    except ImportError:
        load_errors["spguard.kernels"] = "triton is not installed"
        return None
    try:
        return importlib.import_module("spguard.kernels")
    except Exception as exc:  # noqa: BLE001 - a broken triton must not break the package
        load_errors["spguard.kernels"] = f"importing spguard.kernels failed: {type(exc).__name__}: {exc}".splitlines()[0]
        return None


triton_kernels = _load_triton()

__all__ = ["cpp_loaded", "cuda_loaded", "load_errors", "triton_kernels"]
