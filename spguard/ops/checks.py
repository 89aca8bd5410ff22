"""Checks shared by the op tests (tests/test_ops_*.py): backend selection and the tolerance rule."""

from __future__ import annotations

import torch

from . import backends, resolve_backend


def backend_params(*names):
    """pytest params, one per backend, skipped with the reason where that backend is not available."""
    import pytest

    info = {b.name: b for b in backends()}
    return [pytest.param(n, marks=pytest.mark.skipif(not info[n].available, reason=info[n].detail), id=n)
            for n in names]


def select_backend(monkeypatch, name: str, device="cpu", dtype: torch.dtype = torch.float32) -> None:
    """Point SPGUARD_BACKEND at `name` for one test, and check that the dispatcher really takes it."""
    monkeypatch.setenv("SPGUARD_BACKEND", name)
    assert resolve_backend(torch.device(device), dtype) == name


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
