"""Token grounding: a training loss that makes a named object's caption tokens draw their cross-attention
inside that object, as the cross-attention of web-trained models does (docs/design.md, "Grounded
cross-attention").

Trained on the reconstruction loss alone, the shapes model's cross-attention stays uniform over the 25 text
positions: a caption reaches every pixel alike, and the convolutions place the objects. SP-Guard's premise
that a concept's direction and its tokens' attention sit on the unsafe object (paper Sec. 2.3, the gates'
localisation and attention ratio) then fails. This is TokenCompose's token loss (Wang et al., CVPR 2024,
arXiv 2312.03626): for each named object o and each cross-attention layer, with A_o the attention the
object's tokens get at each pixel and M_o its rendered mask (pooled to the layer's grid),
`(1 - sum(A_o * M_o) / sum(A_o))^2`, averaged over objects and layers.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention
from torch import Tensor

from .scene import Scene


class AttentionRecorder:
    """Installs on a UNet's cross-attention layers a processor that computes attention explicitly and keeps
    each layer's head-averaged probabilities (B, queries, tokens) of the current forward pass, with their
    gradients. For training only: the exported model keeps diffusers' own processors."""

    def __init__(self, unet):
        self.probs: list[Tensor] = []
        layers = [m for m in unet.modules() if isinstance(m, Attention) and m.is_cross_attention]
        if not layers:
            raise ValueError("the UNet has no cross-attention layer")
        for attn in layers:
            if attn.norm_cross is not None or attn.group_norm is not None or attn.residual_connection:
                raise ValueError("AttentionRecorder supports plain cross-attention layers only")
            attn.set_processor(self)

    def __call__(self, attn: Attention, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))
        key = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
        value = attn.head_to_batch_dim(attn.to_v(encoder_hidden_states))
        probs = attn.get_attention_scores(query, key, attention_mask)  # (B * heads, queries, tokens)
        self.probs.append(probs.unflatten(0, (-1, attn.heads)).mean(1))
        hidden_states = attn.batch_to_head_dim(torch.bmm(probs, value))
        return attn.to_out[1](attn.to_out[0](hidden_states)) / attn.rescale_output_factor

    def take(self) -> list[Tensor]:
        probs, self.probs = self.probs, []
        return probs


def grounding_targets(scenes: list[Scene], captions: list[str], masks: list[np.ndarray], tokenizer,
                      max_length: int) -> tuple[Tensor, Tensor, Tensor]:
    """(rows (S,), token masks (S, max_length), object masks (S, 1, H, W)) for every object a caption names
    unambiguously: its name words occur once in the caption, and no other object of the scene has the same
    colour and kind (an empty, dropped caption names none)."""
    rows, tokens, objects = [], [], []
    for b, (scene, caption, object_masks) in enumerate(zip(scenes, captions, masks)):
        if not caption:
            continue
        ids = tokenizer(caption, padding="max_length", max_length=max_length, truncation=True).input_ids
        kinds = [(o.colour, o.kind) for o in scene.objects]
        for j, obj in enumerate(scene.objects):
            if kinds.count(kinds[j]) > 1:
                continue
            name = tokenizer(" ".join(obj.name_words), add_special_tokens=False).input_ids
            starts = [i for i in range(len(ids) - len(name) + 1) if ids[i : i + len(name)] == name]
            if len(starts) != 1:
                continue
            token_mask = torch.zeros(max_length)
            token_mask[starts[0] : starts[0] + len(name)] = 1
            rows.append(b)
            tokens.append(token_mask)
            objects.append(torch.from_numpy(object_masks[j]))
    if not rows:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, max_length), torch.zeros(0, 1, 1, 1)
    return torch.tensor(rows), torch.stack(tokens), torch.stack(objects).float()[:, None]


def grounding_loss(probs: list[Tensor], rows: Tensor, token_mask: Tensor, object_mask: Tensor) -> Tensor:
    """TokenCompose's token loss over the recorded layers (module docstring); 0 when no object is named."""
    if len(rows) == 0:
        return probs[0].new_zeros(())
    terms = []
    for layer in probs:  # (B, queries, tokens) on a square grid
        side = math.isqrt(layer.shape[1])
        inside = F.adaptive_avg_pool2d(object_mask, side).flatten(1)  # (S, queries): share of each query's area
        attention = (layer[rows] * token_mask[:, None, :]).sum(-1)  # (S, queries)
        share = (attention * inside).sum(1) / attention.sum(1).clamp_min(torch.finfo(attention.dtype).tiny)
        terms.append(((1 - share) ** 2).mean())
    return torch.stack(terms).mean()
