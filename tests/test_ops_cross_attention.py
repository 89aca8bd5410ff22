"""Every kernel backend of cross_attention_aggregate equals the torch reference (issue 3)."""

from __future__ import annotations

import pytest
import torch

from spguard import ops
from spguard.ops import cases, reference
from spguard.ops.checks import assert_within_rule, backend_params, interpreted, select_backend

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (batch, heads, queries, tokens, head_dim): odd query counts and CLIP's 77 tokens; more tokens than the C++
# kernel's register block holds (120: a full block of 80 and a partial one); small for the Triton interpreter.
CPP_SHAPES = [(1, 8, 63 * 65, 77, 40), (7, 2, 130, 77, 64), (3, 2, 37, 120, 24), (2, 1, 5, 3, 8)]
TRITON_SHAPES = [(2, 2, 33, 77, 40), (1, 1, 5, 3, 8)]
FLOOR = 2e-6  # A is an average of probabilities in [0, 1]: fp32 rounding of exp and sums


def cases_for(*backends):
    return [pytest.param(b.values[0], shape, id=f"{b.id}-{'x'.join(map(str, shape))}", marks=b.marks)
            for b in backend_params(*backends)
            for shape in (TRITON_SHAPES if interpreted(b.values[0]) else CPP_SHAPES)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend,shape", cases_for("cpp", "cuda", "triton"))
def test_aggregate_matches_reference(backend, shape, dtype, monkeypatch):
    device = select_backend(monkeypatch, backend, dtype=dtype)
    q, k, mask = cases.attention_inputs(*shape, dtype=dtype, device=device)
    mask[-1, 0] = True  # samples may select different tokens
    out = ops.cross_attention_aggregate(q, k, mask)
    assert out.dtype == torch.float32 and out.shape == (shape[0], shape[2])
    # The reference upcasts before its matmul, so "plain torch in the same dtype" rounds its inputs only.
    ref_lowp = reference.cross_attention_aggregate(q, k, mask)
    ref32 = reference.cross_attention_aggregate(q.float(), k.float(), mask)
    assert_within_rule(out, ref_lowp, ref32, FLOOR)


@pytest.mark.parametrize("backend", backend_params("cpp", "cuda", "triton"))
def test_aggregate_non_contiguous_and_nan(backend, monkeypatch):
    device = select_backend(monkeypatch, backend)
    q, k, mask = cases.attention_inputs(2, 3, 20, 9, 16, device=device)
    q_t = q.transpose(1, 2).contiguous().transpose(1, 2)  # same values, heads-last storage (the engine's)
    q_s, k_s = (torch.cat([x, x], dim=-1)[..., ::2] for x in (q, k))  # strided last dimension
    assert not (q_t.is_contiguous() or q_s.is_contiguous() or k_s.is_contiguous())
    for q_view in (q_t, q_s):
        torch.testing.assert_close(ops.cross_attention_aggregate(q_view, k_s, mask.float()),
                                   reference.cross_attention_aggregate(q_view, k_s, mask), rtol=1e-5, atol=2e-6)
    q[0, 1, 4, 0] = float("nan")
    out = ops.cross_attention_aggregate(q, k, mask)
    assert out[0, 4].isnan() and out[1].isfinite().all() and out[0, :4].isfinite().all()
