"""Triton cross-attention aggregation (docs/design.md, "The fused operations", op 1;
oracle: spguard.ops.reference.cross_attention_aggregate).

A[b, l] = mean_h sum_{k masked} softmax_k(q[b,h,l] . k[b,h,k] / sqrt(d)). One program per (sample, block
of query rows) loops over the heads; all of a head's keys fit in one tile (K = 77 for CLIP), so the
softmax is exact in one pass and the (B, heads, L, K) probabilities never leave registers.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

BLOCK_L = 64  # query rows per program
MIN_DOT = 16  # tl.dot needs every tile side to be at least 16


@triton.jit
def _aggregate_kernel(q_ptr, k_ptr, mask_ptr, out_ptr, heads, L, K, d, scale,
                      BLOCK_L: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1).to(tl.int64) * BLOCK_L + tl.arange(0, BLOCK_L)
    keys = tl.arange(0, BLOCK_K)
    dims = tl.arange(0, BLOCK_D)
    row_live = rows < L
    key_live = keys < K
    token = tl.load(mask_ptr + b * K + keys, mask=key_live, other=0.0)
    total = tl.zeros((BLOCK_L,), dtype=tl.float32)
    for h in range(heads):
        bh = b * heads + h
        q = tl.load(q_ptr + (bh * L + rows[:, None]) * d + dims[None, :],
                    mask=row_live[:, None] & (dims[None, :] < d), other=0.0).to(tl.float32)
        k = tl.load(k_ptr + (bh * K + keys[:, None]) * d + dims[None, :],
                    mask=key_live[:, None] & (dims[None, :] < d), other=0.0).to(tl.float32)
        scores = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
        scores = tl.where(key_live[None, :], scores, -float("inf"))
        probs = tl.exp(scores - tl.max(scores, axis=1)[:, None])
        total += tl.sum(probs * token[None, :], axis=1) / tl.sum(probs, axis=1)
    tl.store(out_ptr + b * L + rows, total / heads, mask=row_live)


@triton_op("spguard::cross_attention_aggregate_triton", mutates_args=())
def cross_attention_aggregate(q: torch.Tensor, k: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
    B, heads, L, d = q.shape
    K = k.shape[2]
    out = torch.empty((B, L), dtype=torch.float32, device=q.device)
    mask = token_mask.to(torch.float32).contiguous()
    grid = (B, triton.cdiv(L, BLOCK_L))
    wrap_triton(_aggregate_kernel)[grid](
        q.contiguous(), k.contiguous(), mask, out, heads, L, K, d, d**-0.5, BLOCK_L=BLOCK_L,
        BLOCK_K=max(MIN_DOT, triton.next_power_of_2(K)), BLOCK_D=max(MIN_DOT, triton.next_power_of_2(d)))
    return out


@cross_attention_aggregate.register_fake
def _(q, k, token_mask):
    return q.new_empty((q.shape[0], q.shape[2]), dtype=torch.float32)
