"""Triton phase-1 step (docs/design.md, "The fused operations", op 2; oracle: spguard.ops.reference.phase1_step).

One program per (sample, block of elements): it writes eps = e_u + s_g * d_p (Eq. 1) and its block's
partial dot(d_p, d_s[j]), |d_p|^2, |d_s[j]|^2 (for Eq. 6's cosine), so each input is read once; the
partials (a few per sample) are then summed in block order, which keeps the result deterministic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from spguard.ops.schemas import phase1_step_fake

BLOCK = 1024  # elements per program: a multiple of the warp size, several programs per SD-1.5 latent


@triton.jit
def _phase1_kernel(u_ptr, p_ptr, s_ptr, eps_ptr, partial_ptr, n, N, blocks, scale, BLOCK: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1).to(tl.int64)
    offs = blk * BLOCK + tl.arange(0, BLOCK)
    live = offs < n
    u = tl.load(u_ptr + b * n + offs, mask=live, other=0.0).to(tl.float32)
    d_p = tl.load(p_ptr + b * n + offs, mask=live, other=0.0).to(tl.float32) - u  # Eq. 5
    tl.store(eps_ptr + b * n + offs, (u + scale * d_p).to(eps_ptr.dtype.element_ty), mask=live)
    stats = 2 * N + 1  # dot[j], |d_s[j]|^2, then |d_p|^2
    # Each partial is stored as a 1-element block.
    out = partial_ptr + (b * blocks + blk) * stats + tl.arange(0, 1)
    tl.store(out + 2 * N, tl.sum(d_p * d_p, axis=0, keep_dims=True))
    for j in range(N):
        d_s = tl.load(s_ptr + (b * N + j) * n + offs, mask=live, other=0.0).to(tl.float32) - u
        tl.store(out + j, tl.sum(d_p * d_s, axis=0, keep_dims=True))
        tl.store(out + N + j, tl.sum(d_s * d_s, axis=0, keep_dims=True))


# The op returns eps and the (B, 2N + 1) statistics [dot[j], |d_s[j]|^2, |d_p|^2] packed in one tensor;
# `phase1_step` below splits them as the other backends return them. (The op with four outputs failed in
# CI's first run of the suite under Triton's CPU interpreter with "ValueError: vector::reserve", raised by
# the dispatcher before the op's Python body ran; later runs of the same suite passed.)
@triton_op("spguard::phase1_step_triton", mutates_args=())
def phase1_step_packed(e_u: torch.Tensor, e_p: torch.Tensor, e_s: torch.Tensor,
                       guidance_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    B, N = e_s.shape[:2]
    u, p, s = e_u.contiguous(), e_p.contiguous(), e_s.contiguous()
    n = u[0].numel()
    blocks = triton.cdiv(n, BLOCK)
    eps = torch.empty_like(u)
    partials = torch.empty((B, blocks, 2 * N + 1), dtype=torch.float32, device=u.device)
    wrap_triton(_phase1_kernel)[(B, blocks)](u, p, s, eps, partials, n, N, blocks, float(guidance_scale), BLOCK=BLOCK)
    return eps, partials.sum(1)


@phase1_step_packed.register_fake
def _phase1_step_packed_fake(e_u, e_p, e_s, guidance_scale):
    eps, dot, sq_p, sq_s = phase1_step_fake(e_u, e_p, e_s, guidance_scale)
    return eps, torch.cat([dot, sq_s, sq_p[:, None]], 1)


def phase1_step(e_u: torch.Tensor, e_p: torch.Tensor, e_s: torch.Tensor, guidance_scale: float):
    """(eps, dot (B, N), |d_p|^2 (B,), |d_s|^2 (B, N)), as spguard.ops.phase1_step returns them."""
    N = e_s.shape[1]
    eps, stats = torch.ops.spguard.phase1_step_triton(e_u, e_p, e_s, guidance_scale)
    return eps, stats[:, :N], stats[:, 2 * N], stats[:, N : 2 * N]
