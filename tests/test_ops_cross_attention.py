"""Every kernel backend of cross_attention_aggregate equals the torch reference (issues 3 and 13)."""

from __future__ import annotations

import pytest
import torch

from spguard import ops, use_backend
from spguard.attention import ConceptAttention
from spguard.ops import cases, reference
from spguard.ops.checks import assert_within_rule, backend_params, interpreted

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (batch, heads, queries, tokens, head_dim): odd query counts and CLIP's 77 tokens; more tokens than the C++
# kernel's register block holds (120: a full block of 80 and a partial one); small for the Triton interpreter.
CPP_SHAPES = [(1, 8, 63 * 65, 77, 40), (7, 2, 130, 77, 64), (3, 2, 37, 120, 24), (2, 1, 5, 3, 8)]
TRITON_SHAPES = [(2, 2, 33, 77, 40), (1, 1, 5, 3, 8)]
# The cross-attention layers of real models, (batch, heads, queries, tokens, head_dim) at their latent grids.
# SD 1.5 (512 px: 64x64 latents): 8 heads of 40, 80, 160 and 160 dims at 64x64, 32x32, 16x16 and the 8x8
# middle block; SD 2.x: heads of 64 dims (5, 10, 20 of them); SDXL: 10 and 20 heads of 64 dims at 64x64 and
# 32x32 (1024 px); CLIP's 77 tokens, and 154 or 231 for long prompts chunked into two or three windows.
MODEL_SHAPES = {
    "sd15-64x64": (1, 8, 64 * 64, 77, 40),
    "sd15-32x32": (1, 8, 32 * 32, 77, 80),
    "sd15-16x16": (2, 8, 16 * 16, 77, 160),
    "sd15-8x8": (2, 8, 8 * 8, 77, 160),
    "sd2-64x64": (1, 5, 64 * 64, 77, 64),
    "sd2-16x16": (2, 20, 16 * 16, 77, 64),
    "sdxl-64x64": (1, 10, 64 * 64, 77, 64),
    "sdxl-32x32": (1, 20, 32 * 32, 77, 64),
    "sd15-64x64-154-tokens": (1, 8, 64 * 64, 154, 40),
    "sd15-16x16-231-tokens": (1, 8, 16 * 16, 231, 160),
    "sdxl-32x32-231-tokens": (1, 20, 32 * 32, 231, 64),
}
INTERPRETED_QUERIES = 17  # the Triton interpreter runs each shape at one sample and a short query length
FLOOR = 2e-6  # A is an average of probabilities in [0, 1]: fp32 rounding of exp and sums


def cases_for(*backends):
    return [pytest.param(b.values[0], shape, id=f"{b.id}-{'x'.join(map(str, shape))}", marks=b.marks)
            for b in backend_params(*backends)
            for shape in (TRITON_SHAPES if interpreted(b.values[0]) else CPP_SHAPES)]


def model_cases(*backends):
    params = []
    for b in backend_params(*backends):
        for name, (batch, heads, queries, tokens, head_dim) in MODEL_SHAPES.items():
            if interpreted(b.values[0]):
                batch, queries = 1, INTERPRETED_QUERIES
            params.append(pytest.param(b.values[0], (batch, heads, queries, tokens, head_dim), id=f"{b.id}-{name}",
                                       marks=b.marks))
    return params


def check_against_reference(shape, dtype, device):
    q, k, mask = cases.attention_inputs(*shape, dtype=dtype, device=device)
    mask[-1, 0] = True  # samples may select different tokens
    out = ops.cross_attention_aggregate(q, k, mask)
    assert out.dtype == torch.float32 and out.shape == (shape[0], shape[2])
    # The reference upcasts before its matmul, so "plain torch in the same dtype" rounds its inputs only.
    ref_lowp = reference.cross_attention_aggregate(q, k, mask)
    ref32 = reference.cross_attention_aggregate(q.float(), k.float(), mask)
    assert_within_rule(out, ref_lowp, ref32, FLOOR)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend,shape", cases_for("cpp", "cuda", "triton"))
def test_aggregate_matches_reference(backend, shape, dtype, select_backend):
    check_against_reference(shape, dtype, select_backend(backend))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend,shape", model_cases("cpp", "cuda", "triton"))
def test_aggregate_at_model_shapes(backend, shape, dtype, select_backend):
    check_against_reference(shape, dtype, select_backend(backend))


@pytest.mark.parametrize("backend", backend_params("cpp", "cuda", "triton"))
def test_aggregate_non_contiguous_and_nan(backend, select_backend):
    device = select_backend(backend)
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


SD15_CROSS_ATTENTION_LAYERS = 16  # 6 in the down blocks, 1 in the middle block, 9 in the up blocks


@pytest.mark.slow
@pytest.mark.parametrize("backend", backend_params("cpp"))
def test_sd15_attention_mask_capture(backend):
    """SP-Guard's attention mask captured from every cross-attention layer of an SD-1.5-sized UNet at 512 px
    (heads of 40, 80 and 160 dims, 4096 to 64 queries) through the dispatcher equals the torch backend's."""
    from spguard.testing import sd15_unet

    unet = sd15_unet()
    gen = torch.Generator().manual_seed(0)
    latents, text = torch.randn((1, 4, 64, 64), generator=gen), torch.randn((1, 77, 768), generator=gen)
    token_mask = torch.zeros((1, 77), dtype=torch.bool)
    token_mask[:, cases.CONCEPT_TOKENS] = True
    maps = {}
    with torch.no_grad():
        for name in ("torch", backend):
            with use_backend(name), ConceptAttention(unet) as capture:
                capture.begin(token_mask, (64, 64))
                unet(latents, 500, text)
                layers = capture.layers
                maps[name] = capture.take()
            assert layers == SD15_CROSS_ATTENTION_LAYERS
    assert maps[backend].shape == (1, 64 * 64) and maps["torch"].std() > 0
    torch.testing.assert_close(maps[backend], maps["torch"], rtol=0, atol=1e-5)
