"""Plain-PyTorch reference of the three fused operations (docs/design.md, "The fused operations").

This module is the single home of the guidance math: the C++, CUDA and Triton kernels are faster
copies of these functions and are tested against them. Equation numbers refer to the SP-Guard paper
(Yu & Moon, arXiv 2511.11014). All math runs in fp32 whatever the input dtype; eps is returned in the
input dtype, every statistic in fp32.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def quantile_index(q: float, n: int) -> int:
    """Index of the q-quantile among n ascending-sorted values (docs/design.md, "The quantile": floor(q * (n - 1))).

    Computed once on the host, in Python floats, so every backend uses the same index.
    """
    return math.floor(q * (n - 1))


def _threshold(values: Tensor, q: float) -> Tensor:
    """Per-row q-quantile of a (B, n) tensor: the value at quantile_index(q, n) of the sorted row."""
    k = quantile_index(q, values.shape[1])
    return torch.kthvalue(values, k + 1, dim=1, keepdim=True).values


def safe_cosine(dot: Tensor, sq_a: Tensor, sq_b: Tensor) -> Tensor:
    """cos = dot / (|a| |b|), defined as 0 where either norm is 0."""
    denom = torch.sqrt(sq_a * sq_b)
    return torch.where(denom > 0, dot / denom, torch.zeros_like(dot))


def cross_attention_aggregate(q: Tensor, k: Tensor, token_mask: Tensor) -> Tensor:
    """Attention the queries give to the masked tokens, averaged over heads.

    q: (B, heads, L, d), k: (B, heads, K, d), token_mask: (B, K) (bool or 0/1).
    Returns A: (B, L) fp32 = mean over heads of sum over masked tokens of softmax(q k^T / sqrt(d)).
    """
    scale = q.shape[-1] ** -0.5
    probs = torch.softmax(q.float() @ k.float().transpose(-1, -2) * scale, dim=-1)
    return (probs * token_mask.float()[:, None, None, :]).sum(-1).mean(1)


def phase1_step(e_u: Tensor, e_p: Tensor, e_s: Tensor, guidance_scale: float):
    """SP-Guard phase 1 (steps i < t_p): plain CFG plus the statistics of the running cosine.

    e_u, e_p: (B, C, H, W); e_s: (B, N, C, H, W), one row per unsafe concept.
    Returns eps (B, C, H, W) in the input dtype (Eq. 1), and in fp32 dot(d_p, d_s[j]) (B, N),
    |d_p|^2 (B,) and |d_s[j]|^2 (B, N), from which Eq. 6's cosine is formed.
    """
    u = e_u.float()
    d_p = e_p.float() - u  # Eq. 5
    d_s = e_s.float() - u[:, None]
    eps = (u + guidance_scale * d_p).to(e_u.dtype)
    dot = (d_p[:, None] * d_s).flatten(2).sum(-1)
    sq_p = d_p.flatten(1).square().sum(-1)
    sq_s = d_s.flatten(2).square().sum(-1)
    return eps, dot, sq_p, sq_s


def aligned_scores(e_u: Tensor, e_p: Tensor, e_s: Tensor) -> Tensor:
    """The aligned mask's per-pixel scores (..., H*W) fp32 at one step: max(0, d_p . d_s) over the channels,
    i.e. |d_p| |d_s| max(0, psi). Inputs are (..., C, H, W) and broadcast: e_u, e_p (B, 1, C, H, W) against
    e_s (B, N, C, H, W) score every concept at once. SP-Guard's guider ranks their sum over the guided steps so far, started
    (when it guides from before t_p) from phase 1's sum over those steps, made concept-specific
    (`concept_specific`).

    Large where the prompt and the concept both draw strongly and in the same direction, i.e. where the
    prompt draws what the concept would. Where the two disagree (a benign object the concept text would
    repaint) the score is 0; where the prompt draws little (background the concept text would fill) it is
    small (docs/design.md, "The aligned mask": a departure from the paper).
    """
    u = e_u.float()
    d_p = e_p.float() - u  # Eq. 5
    d_s = e_s.float() - u
    return (d_p * d_s).sum(-3).clamp(min=0).flatten(-2)


def concept_specific(scores: Tensor) -> Tensor:
    """(B, N, L) per-concept scores -> each concept's minus the mean of the other concepts' (unchanged for N = 1).

    What concept texts share (on the shapes model: "an object here", wherever the image is forming one) cancels;
    what is left is where the image draws this concept rather than any (docs/design.md, "The aligned mask").
    """
    n = scores.shape[1]
    if n == 1:
        return scores
    return scores - (scores.sum(1, keepdim=True) - scores) / (n - 1)


def phase2_step(
    e_u: Tensor,
    e_p: Tensor,
    e_s: Tensor,
    strength: Tensor,
    guidance_scale: float,
    q: float,
    pixel_scores: Tensor | None = None,
):
    """SP-Guard phase 2 (steps i >= t_p): selective, prompt-adaptive safe guidance.

    e_u, e_p, e_s: (B, C, H, W), e_s for the concept chosen at the end of phase 1.
    strength: (B,) fp32, lambda(i) * P+ for each sample (Eq. 7 without the mask).
    pixel_scores: None for the noise mask (Eq. 8), or a (B, H*W) map whose top share (above its
    q-quantile) is the region on every channel: the aggregated concept-token attention (the attention
    mask) or `aligned_scores` (the aligned mask).
    Returns eps (B, C, H, W) in the input dtype and the weight M (B, C, H, W) fp32, 0 outside R.
    """
    B, C, H, W = e_u.shape
    u = e_u.float()
    d_p = e_p.float() - u  # Eq. 5
    d_s = e_s.float() - u
    # psi: per-pixel cosine over channels (Eq. 8).
    psi = safe_cosine((d_p * d_s).sum(1), d_p.square().sum(1), d_s.square().sum(1))  # (B, H, W)
    if pixel_scores is None:
        # Region R: |d_s| above its per-sample q-quantile (Eq. 8).
        magnitude = d_s.abs().reshape(B, -1)
        region = (magnitude > _threshold(magnitude, q)).reshape(B, C, H, W)
    else:
        scores = pixel_scores.float().reshape(B, -1)
        region = (scores > _threshold(scores, q)).reshape(B, 1, H, W).expand(B, C, H, W)
    weight = region * (1 + psi.abs())[:, None]  # M (Eq. 8 as printed: 1 + max(0, |psi|))
    mu = strength.float()[:, None, None, None] * weight  # Eq. 7
    eps = (u + guidance_scale * (d_p - mu * d_s)).to(e_u.dtype)  # Eq. 2, 3
    return eps, weight
