"""Checks shared by the op tests (tests/test_ops_*.py): backend selection and the tolerance rule."""

from __future__ import annotations

import torch

from . import backends


def backend_params(*names):
    """pytest params, one per backend, skipped with the reason where that backend is not available."""
    import pytest

    info = {b.name: b for b in backends()}
    return [pytest.param(n, marks=pytest.mark.skipif(not info[n].available, reason=info[n].detail), id=n)
            for n in names]


def backend_device(name: str) -> torch.device:
    """Where a backend's tests run: the CUDA kernels on the GPU, Triton on the GPU where there is one
    (else on the CPU, under TRITON_INTERPRET=1), the C++ kernels and torch on the CPU."""
    on_gpu = name == "cuda" or (name == "triton" and torch.cuda.is_available())
    return torch.device("cuda" if on_gpu else "cpu")


def interpreted(name: str) -> bool:
    """Triton without a GPU runs in its interpreter, about 100x slower than torch: small shapes only."""
    return name == "triton" and backend_device(name).type == "cpu"


def assert_within_rule(out, ref_same_dtype, ref_fp32, floor: float) -> None:
    """Error vs the fp32 reference at most twice plain torch's error in the same dtype, plus `floor`."""
    out, ref_same_dtype, ref_fp32 = out.float(), ref_same_dtype.float(), ref_fp32.float()
    assert out.shape == ref_fp32.shape, (out.shape, ref_fp32.shape)
    err = (out - ref_fp32).abs().max().item()
    torch_err = (ref_same_dtype - ref_fp32).abs().max().item()
    assert err <= 2 * torch_err + floor, f"error {err:.3g} vs torch's {torch_err:.3g} (floor {floor:.3g})"


def relative_floor(ref, rel: float = 1e-5) -> float:
    """`rel` times the reference's magnitude: what fp32 rounding in another order can account for."""
    return rel * (1.0 + ref.float().abs().max().item())
