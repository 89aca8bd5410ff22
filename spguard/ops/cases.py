"""Input factories shared by the op tests and the kernel benchmarks (SD-1.5 shapes, docs/design.md,
"The fused operations")."""

from __future__ import annotations

import torch
from torch import Tensor

#: SD-1.5 at 512 px: 4x64x64 latents; cross-attention at the 64x64 level: 8 heads of 40 dims, 77 tokens.
SD15_LATENT = (4, 64, 64)
SD15_ATTENTION = dict(heads=8, queries=64 * 64, tokens=77, head_dim=40)
#: CLIP's start token sits at 0; an SP-Guard concept prompt fills a few tokens, then end/padding follow.
CONCEPT_TOKENS = slice(1, 20)


def latent_triplet(batch: int, channels: int, height: int, width: int, concepts: int | None = None,
                   dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                   seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """e_u, e_p, e_s like a UNet's noise estimates; e_s is (B, N, C, H, W) when `concepts` is given."""
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, channels, height, width)
    e_u = torch.randn(shape, generator=gen)
    e_p = e_u + 0.3 * torch.randn(shape, generator=gen)
    s_shape = shape if concepts is None else (batch, concepts, *shape[1:])
    base = e_u if concepts is None else e_u[:, None]
    e_s = base + 0.3 * torch.randn(s_shape, generator=gen)
    return tuple(t.to(device=device, dtype=dtype) for t in (e_u, e_p, e_s))


def strength(batch: int, device: str | torch.device = "cpu", seed: int = 0) -> Tensor:
    """lambda(i) * P+ per sample: some samples unguided (0), the rest at up to lambda_max = 4."""
    gen = torch.Generator().manual_seed(seed)
    values = 4.0 * torch.rand(batch, generator=gen)
    values[::3] = 0.0
    return values.to(device)


def attention_map(batch: int, pixels: int, device: str | torch.device = "cpu", seed: int = 0) -> Tensor:
    """(B, H*W) aggregated concept attention, in [0, 1]."""
    gen = torch.Generator().manual_seed(seed)
    return torch.rand((batch, pixels), generator=gen).to(device)


def attention_inputs(batch: int, heads: int, queries: int, tokens: int, head_dim: int,
                     dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                     seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """q (B, heads, L, d), k (B, heads, K, d), token_mask (B, K) bool selecting the concept tokens."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn((batch, heads, queries, head_dim), generator=gen)
    k = torch.randn((batch, heads, tokens, head_dim), generator=gen)
    mask = torch.zeros((batch, tokens), dtype=torch.bool)
    mask[:, CONCEPT_TOKENS.start:min(CONCEPT_TOKENS.stop, tokens)] = True
    return q.to(device=device, dtype=dtype), k.to(device=device, dtype=dtype), mask.to(device)
