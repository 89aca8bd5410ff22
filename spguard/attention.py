"""Cross-attention capture for SP-Guard's attention mask.

`ConceptAttention` installs a processor on the UNet's cross-attention layers. For the concept rows
of a UNet call (the last rows of the batch) it accumulates, per layer, the attention the queries
give to the concept's content tokens (ops.cross_attention_aggregate), resized to the latent grid
and averaged over layers. Only the current step's (rows, H, W) map is kept; the attention output
itself still comes from scaled_dot_product_attention, exactly as diffusers' AttnProcessor2_0.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from . import ops


class ConceptAttention:
    """Shared state of the processors: which rows to aggregate, and the running per-step map."""

    def __init__(self, unet, layers: tuple[str, ...] | None = None):
        self.unet = unet
        self.original = dict(unet.attn_processors)
        self.processors = {}
        for name, proc in self.original.items():
            cross = ".attn2." in name  # diffusers names cross-attention "attn2" in transformer blocks
            if cross and (layers is None or any(part in name for part in layers)):
                proc = _Processor(self)
                self.processors[name] = proc
            self.processors.setdefault(name, self.original[name])
        if not any(isinstance(p, _Processor) for p in self.processors.values()):
            raise ValueError(f"no cross-attention layer of the UNet matches {layers}")
        self.first_row = None  # None: capture off

    def __enter__(self):
        self.unet.set_attn_processor(dict(self.processors))
        return self

    def __exit__(self, *exc):
        self.unet.set_attn_processor(dict(self.original))

    def begin(self, first_row: int, token_mask: Tensor, size: tuple[int, int]):
        """Capture the rows from `first_row` on, in the next UNet call, at latent size (H, W)."""
        self.first_row, self.token_mask, self.size = first_row, token_mask, size
        self.total, self.layers = None, 0

    def end(self) -> Tensor:
        """The captured map (rows, H * W), averaged over layers; turns capture off."""
        self.first_row = None
        return (self.total / self.layers).flatten(1)

    def add(self, query: Tensor, key: Tensor):
        rows = slice(self.first_row, None)
        attention = ops.cross_attention_aggregate(query[rows], key[rows], self.token_mask)  # (n, L)
        h, w = _layer_grid(attention.shape[1], *self.size)
        attention = F.interpolate(attention.view(-1, 1, h, w), size=self.size, mode="bilinear", align_corners=False)
        self.total = attention[:, 0] if self.total is None else self.total + attention[:, 0]
        self.layers += 1


def _layer_grid(length: int, height: int, width: int) -> tuple[int, int]:
    """The (h, w) grid of a layer with `length` queries: the latent grid halved by stride-2 convs."""
    for level in range(8):
        h, w = height, width
        for _ in range(level):
            h, w = math.ceil(h / 2), math.ceil(w / 2)
        if h * w == length:
            return h, w
    raise ValueError(f"cannot map {length} attention queries onto a {height}x{width} latent grid")


class _Processor:
    """diffusers' AttnProcessor2_0, plus the concept-token aggregation for captured rows."""

    def __init__(self, capture: ConceptAttention):
        self.capture = capture

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if self.capture.first_row is not None:
            self.capture.add(query, key)

        hidden_states = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states.to(query.dtype)))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor
