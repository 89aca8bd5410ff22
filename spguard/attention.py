"""Cross-attention capture for SP-Guard's attention mask, by forward hooks.

`ConceptAttention` hooks the query and key projections (`to_q`, `to_k`) of the UNet's cross-attention
layers, so whatever attention processors are installed (diffusers' own, xformers, IP-Adapter, a user's)
keep running unchanged. For the concept rows of a UNet call (the rows from `first_row` on) it reduces
each layer's q and k to the attention the queries give the concept's content tokens
(ops.cross_attention_aggregate), resized to the latent grid and averaged over layers (docs/design.md,
"Attention capture"). Only the current step's (rows, H, W) map is kept.
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from diffusers.models.attention_processor import Attention
from torch import Tensor

from . import ops


class ConceptAttention:
    """Hooks on the chosen cross-attention layers (all, or those whose module name contains one of
    `layers`); installed inside `with`, capturing once `begin` has armed them."""

    def __init__(self, unet, layers: tuple[str, ...] | None = None, first_row: int = 0):
        self.modules = [(name, m) for name, m in unet.named_modules() if isinstance(m, Attention)
                        and m.is_cross_attention and (layers is None or any(part in name for part in layers))]
        if not self.modules:
            raise ValueError(f"no cross-attention layer of the UNet matches {layers}")
        self.first_row, self.token_mask = first_row, None  # token_mask None: capture off
        self.handles = []

    def __enter__(self):
        for _, attn in self.modules:
            seen = {}  # this layer's q and k of the current call, whichever projection runs first
            for kind, projection in (("q", attn.to_q), ("k", attn.to_k)):
                self.handles.append(projection.register_forward_hook(self._hook(attn, seen, kind)))
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def begin(self, token_mask: Tensor, size: tuple[int, int]):
        """Capture the concept rows, whose content tokens are `token_mask` (rows, K), at latent size (H, W)."""
        self.token_mask, self.size = token_mask, size
        self.total, self.layers = None, 0

    def take(self) -> Tensor:
        """The map (rows, H * W) of the last UNet call, averaged over layers; starts the next call's."""
        if not self.layers:
            raise RuntimeError("no cross-attention layer computed its query and key through to_q and to_k "
                               "(fused projections cannot be captured)")
        total, self.total, self.layers = self.total / self.layers, None, 0
        return total.flatten(1)

    def _hook(self, attn: Attention, seen: dict, kind: str):
        def hook(module, inputs, output):
            if self.token_mask is None:
                return
            seen[kind] = output[self.first_row :]
            if len(seen) == 2:
                self._add(attn, seen.pop("q"), seen.pop("k"))
        return hook

    def _add(self, attn: Attention, query: Tensor, key: Tensor):
        attention = ops.cross_attention_aggregate(*split_heads(attn, query, key), self.token_mask)  # (rows, L)
        h, w = _layer_grid(attention.shape[1], *self.size)
        attention = F.interpolate(attention.view(-1, 1, h, w), size=self.size, mode="bilinear", align_corners=False)
        self.total = attention[:, 0] if self.total is None else self.total + attention[:, 0]
        self.layers += 1


def split_heads(attn: Attention, query: Tensor, key: Tensor) -> tuple[Tensor, Tensor]:
    """q and k as diffusers' processors split them, (rows, tokens, heads * d) -> (rows, heads, tokens, d), with
    the layer's q and k norms applied."""
    query = query.unflatten(-1, (attn.heads, -1)).transpose(1, 2)
    key = key.unflatten(-1, (attn.heads, -1)).transpose(1, 2)
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    return query, key


def _layer_grid(length: int, height: int, width: int) -> tuple[int, int]:
    """The (h, w) grid of a layer with `length` queries: the latent grid halved by stride-2 convs."""
    for level in range(8):
        h, w = height, width
        for _ in range(level):
            h, w = math.ceil(h / 2), math.ceil(w / 2)
        if h * w == length:
            return h, w
    raise ValueError(f"cannot map {length} attention queries onto a {height}x{width} latent grid")
