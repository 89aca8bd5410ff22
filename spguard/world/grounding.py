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
from torch import Tensor

from ..attention import ConceptAttention, split_heads
from ..ops import reference
from .scene import Scene


class GroundingAttention(ConceptAttention):
    """The attention mask's hooks on q and k (spguard.attention), installed for the training model's lifetime:
    for the rows and token masks `begin` names, each cross-attention layer's map (rows, queries) of the next
    forward pass at the layer's own resolution, with gradients (ops' torch reference: the kernels have none).
    diffusers' processors keep computing the forward pass."""

    def __init__(self, unet):
        super().__init__(unet)
        self.__enter__()
        self.maps: list[Tensor] = []

    def begin(self, rows: Tensor, token_mask: Tensor):
        self.rows, self.token_mask, self.maps = rows, token_mask, []

    def take(self) -> list[Tensor]:
        maps, self.maps, self.token_mask = self.maps, [], None
        return maps

    def _add(self, attn, query: Tensor, key: Tensor):
        query, key = split_heads(attn, query[self.rows], key[self.rows])
        self.maps.append(reference.cross_attention_aggregate(query, key, self.token_mask))


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


def grounding_loss(maps: list[Tensor], object_mask: Tensor) -> Tensor:
    """TokenCompose's token loss over the captured layers' maps (S, queries) on square grids (module
    docstring); 0 when no object is named."""
    if len(object_mask) == 0:
        return object_mask.new_zeros(())
    terms = []
    for attention in maps:
        inside = F.adaptive_avg_pool2d(object_mask, math.isqrt(attention.shape[1])).flatten(1)  # share of each query's area
        share = (attention * inside).sum(1) / attention.sum(1).clamp_min(torch.finfo(attention.dtype).tiny)
        terms.append(((1 - share) ** 2).mean())
    return torch.stack(terms).mean()
