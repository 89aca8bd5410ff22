"""Triton phase-2 step (docs/design.md, "The fused operations", op 3; oracle: spguard.ops.reference.phase2_step).

Passes over the latents: two with the noise mask, one with a per-pixel score map (the attention or the
aligned mask). eta, the per-sample
q-quantile, is an order statistic of all C*H*W values of |d_s|, so no element's membership is known
before every element has been seen: the first kernel reads e_u and e_s and writes |d_s| (fp32), eta is
selected from those magnitudes, and the second kernel reads the three inputs once more, forms psi per
pixel over the channels (Eq. 8), M, mu (Eq. 7) and eps (Eq. 2, 3). With a score map eta comes from the
(B, H*W) map alone. The selection itself is torch.kthvalue on the magnitudes (a radix select
on the GPU); the C++/CUDA backends fuse it as a histogram select on the float bits instead.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from spguard.ops.reference import quantile_index
from spguard.ops.schemas import phase2_step_fake

BLOCK = 1024  # elements per program of the magnitude kernel
BLOCK_PIXELS = 256  # pixels per program of the output kernel; each loops over the channels twice


@triton.jit
def _magnitude_kernel(u_ptr, s_ptr, out_ptr, total, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    live = offs < total
    u = tl.load(u_ptr + offs, mask=live, other=0.0).to(tl.float32)
    s = tl.load(s_ptr + offs, mask=live, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, tl.abs(s - u), mask=live)


@triton.jit
def _guidance_kernel(u_ptr, p_ptr, s_ptr, strength_ptr, eta_ptr, map_ptr, eps_ptr, weight_ptr, C, hw, scale,
                     PIXEL_SCORES: tl.constexpr, BLOCK_PIXELS: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    pix = tl.program_id(1).to(tl.int64) * BLOCK_PIXELS + tl.arange(0, BLOCK_PIXELS)
    live = pix < hw
    base = b * C * hw + pix
    dot = tl.zeros((BLOCK_PIXELS,), dtype=tl.float32)
    sq_p = tl.zeros((BLOCK_PIXELS,), dtype=tl.float32)
    sq_s = tl.zeros((BLOCK_PIXELS,), dtype=tl.float32)
    for c in range(C):
        u = tl.load(u_ptr + base + c * hw, mask=live, other=0.0).to(tl.float32)
        d_p = tl.load(p_ptr + base + c * hw, mask=live, other=0.0).to(tl.float32) - u  # Eq. 5
        d_s = tl.load(s_ptr + base + c * hw, mask=live, other=0.0).to(tl.float32) - u
        dot += d_p * d_s
        sq_p += d_p * d_p
        sq_s += d_s * d_s
    # psi: per-pixel cosine over channels, 0 where a norm is 0 (Eq. 8); M = R * (1 + |psi|).
    denom = tl.sqrt(sq_p * sq_s)
    bonus = 1.0 + tl.abs(tl.where(denom > 0, dot / tl.where(denom > 0, denom, 1.0), 0.0))
    strength = tl.load(strength_ptr + b)
    eta = tl.load(eta_ptr + b)
    if PIXEL_SCORES:
        pixel_score = tl.load(map_ptr + b * hw + pix, mask=live, other=0.0)
    for c in range(C):
        u = tl.load(u_ptr + base + c * hw, mask=live, other=0.0).to(tl.float32)
        d_p = tl.load(p_ptr + base + c * hw, mask=live, other=0.0).to(tl.float32) - u
        d_s = tl.load(s_ptr + base + c * hw, mask=live, other=0.0).to(tl.float32) - u
        if PIXEL_SCORES:
            score = pixel_score
        else:
            score = tl.abs(d_s)
        weight = (score > eta).to(tl.float32) * bonus
        tl.store(weight_ptr + base + c * hw, weight, mask=live)
        eps = u + scale * (d_p - strength * weight * d_s)  # Eq. 7, 2, 3
        tl.store(eps_ptr + base + c * hw, eps.to(eps_ptr.dtype.element_ty), mask=live)


@triton_op("spguard::phase2_step_triton", mutates_args=())
def phase2_step(e_u: torch.Tensor, e_p: torch.Tensor, e_s: torch.Tensor, strength: torch.Tensor,
                guidance_scale: float, q: float, pixel_scores: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    B, C, H, W = e_u.shape
    hw = H * W
    u, p, s = e_u.contiguous(), e_p.contiguous(), e_s.contiguous()
    if pixel_scores is None:
        scores = torch.empty((B, C * hw), dtype=torch.float32, device=u.device)
        wrap_triton(_magnitude_kernel)[(triton.cdiv(u.numel(), BLOCK),)](u, s, scores, u.numel(), BLOCK=BLOCK)
        score_map = scores  # unused by the kernel when PIXEL_SCORES is False
    else:
        scores = score_map = pixel_scores.to(torch.float32).reshape(B, hw).contiguous()
    eta = torch.kthvalue(scores, quantile_index(q, scores.shape[1]) + 1, dim=1).values.contiguous()
    eps = torch.empty_like(u)
    weight = torch.empty(u.shape, dtype=torch.float32, device=u.device)
    wrap_triton(_guidance_kernel)[(B, triton.cdiv(hw, BLOCK_PIXELS))](
        u, p, s, strength.to(torch.float32).contiguous(), eta, score_map, eps, weight, C, hw, float(guidance_scale),
        PIXEL_SCORES=pixel_scores is not None, BLOCK_PIXELS=BLOCK_PIXELS)
    return eps, weight


phase2_step.register_fake(phase2_step_fake)
