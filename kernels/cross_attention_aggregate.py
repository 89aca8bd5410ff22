"""Triton cross-attention aggregation (docs/design.md, "The fused operations", op 1; oracle:
spguard.ops.reference.cross_attention_aggregate).

A[b, l] = mean_h sum_{k masked} softmax_k(q[b,h,l] . k[b,h,k] / sqrt(d)). One program per (sample, block
of query rows) loops over the heads and, within a head, over tiles of BLOCK_K tokens with an online softmax
(running max, total and masked total), so any token count works (CLIP's 77, or 154 and 231 for chunked long
prompts) and the (B, heads, L, K) probabilities never leave registers.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from spguard.ops.schemas import cross_attention_aggregate_fake

MAX_HEAD_DIM = 256  # one register tile spans the head: SD 1.5's largest head has 160 dims, SDXL's 64
BLOCK_K = 32  # tokens per tile
MIN_DOT = 16  # tl.dot needs every tile side to be at least 16


def _block_rows(block_d: int) -> int:
    """Query rows per program: 64, halved for heads wider than 64 dims to keep the q tile in registers."""
    return 64 if block_d <= 64 else 32


@triton.jit
def _aggregate_kernel(q_ptr, k_ptr, mask_ptr, out_ptr, heads, L, K, d, scale,
                      BLOCK_L: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1).to(tl.int64) * BLOCK_L + tl.arange(0, BLOCK_L)
    dims = tl.arange(0, BLOCK_D)
    row_live = rows < L
    dim_live = dims < d
    total = tl.zeros((BLOCK_L,), dtype=tl.float32)
    for h in range(heads):
        bh = b * heads + h
        q = tl.load(q_ptr + (bh * L + rows[:, None]) * d + dims[None, :],
                    mask=row_live[:, None] & dim_live[None, :], other=0.0).to(tl.float32)
        peak = tl.full((BLOCK_L,), -float("inf"), dtype=tl.float32)
        total_e = tl.zeros((BLOCK_L,), dtype=tl.float32)
        masked_e = tl.zeros((BLOCK_L,), dtype=tl.float32)
        for first in range(0, K, BLOCK_K):
            keys = first + tl.arange(0, BLOCK_K)
            key_live = keys < K
            k = tl.load(k_ptr + (bh * K + keys[:, None]) * d + dims[None, :],
                        mask=key_live[:, None] & dim_live[None, :], other=0.0).to(tl.float32)
            token = tl.load(mask_ptr + b * K + keys, mask=key_live, other=0.0)
            scores = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
            scores = tl.where(key_live[None, :], scores, -float("inf"))
            # Online softmax: rescale the running sums to the new maximum.
            new_peak = tl.maximum(peak, tl.max(scores, axis=1))
            rescale = tl.exp(peak - new_peak)
            probs = tl.exp(scores - new_peak[:, None])
            total_e = total_e * rescale + tl.sum(probs, axis=1)
            masked_e = masked_e * rescale + tl.sum(probs * token[None, :], axis=1)
            peak = new_peak
        total += masked_e / total_e
    tl.store(out_ptr + b * L + rows, total / heads, mask=row_live)


@triton_op("spguard::cross_attention_aggregate_triton", mutates_args=())
def cross_attention_aggregate(q: torch.Tensor, k: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
    B, heads, L, d = q.shape
    K = k.shape[2]
    out = torch.empty((B, L), dtype=torch.float32, device=q.device)
    mask = token_mask.to(torch.float32).contiguous()
    block_d = max(MIN_DOT, triton.next_power_of_2(d))
    block_l = _block_rows(block_d)
    wrap_triton(_aggregate_kernel)[(B, triton.cdiv(L, block_l))](
        q.contiguous(), k.contiguous(), mask, out, heads, L, K, d, d**-0.5, BLOCK_L=block_l, BLOCK_K=BLOCK_K,
        BLOCK_D=block_d)
    return out


cross_attention_aggregate.register_fake(cross_attention_aggregate_fake)
