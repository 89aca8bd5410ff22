"""The fused ops' schemas, input checks and fake implementations, defined once (docs/design.md, "Fused
operations"; the math is in spguard.ops.reference).

The ops `torch.ops.spguard.*` are defined here, whether or not an extension is built: spguard._C registers
CPU kernels for them and spguard._C_cuda CUDA kernels. The Triton ops (spguard.kernels, `*_triton`) have the
same signatures and register these fakes. Each `*_problem` function names the first requirement of the
kernels that some inputs break (None when they take them): the dispatcher uses it to choose a backend, and
the fakes raise it through torch._check, so torch.compile rejects bad inputs while tracing.
"""

from __future__ import annotations

import torch
from torch import Tensor

#: The dtypes every kernel takes; anything else runs on the torch reference.
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

SCHEMAS = {
    "cross_attention_aggregate": "cross_attention_aggregate(Tensor q, Tensor k, Tensor token_mask) -> Tensor",
    "phase1_step": "phase1_step(Tensor e_u, Tensor e_p, Tensor e_s, float guidance_scale)"
                   " -> (Tensor, Tensor, Tensor, Tensor)",
    "phase2_step": "phase2_step(Tensor e_u, Tensor e_p, Tensor e_s, Tensor strength, float guidance_scale,"
                   " float q, Tensor? pixel_scores) -> (Tensor, Tensor)",
}

_LIBRARY = torch.library.Library("spguard", "DEF")
for _schema in SCHEMAS.values():
    _LIBRARY.define(_schema)


def _dtype_problem(*tensors: Tensor) -> str | None:
    dtypes = {t.dtype for t in tensors}
    if len(dtypes) > 1:
        return f"inputs have different dtypes ({', '.join(sorted(str(d) for d in dtypes))})"
    if tensors[0].dtype not in KERNEL_DTYPES:
        return f"the kernels take float32, float16 or bfloat16, not {tensors[0].dtype}"
    return None


def _device_problem(*tensors: Tensor) -> str | None:
    devices = {t.device for t in tensors}
    return None if len(devices) == 1 else f"inputs are on different devices ({', '.join(map(str, devices))})"


def cross_attention_aggregate_problem(q: Tensor, k: Tensor, token_mask: Tensor) -> str | None:
    if q.dim() != 4 or k.dim() != 4:
        return f"q and k must be (B, heads, L, d) and (B, heads, K, d), got {tuple(q.shape)} and {tuple(k.shape)}"
    if k.shape[0] != q.shape[0] or k.shape[1] != q.shape[1] or k.shape[3] != q.shape[3]:
        return f"q {tuple(q.shape)} and k {tuple(k.shape)} disagree"
    if q.shape[1] == 0 or k.shape[2] == 0 or q.shape[3] == 0:
        return f"needs at least one head, token and head dimension, got q {tuple(q.shape)} and k {tuple(k.shape)}"
    if tuple(token_mask.shape) != (q.shape[0], k.shape[2]):
        return f"token_mask must be (B, K) = {(q.shape[0], k.shape[2])}, got {tuple(token_mask.shape)}"
    return _dtype_problem(q, k) or _device_problem(q, k, token_mask)


def phase1_step_problem(e_u: Tensor, e_p: Tensor, e_s: Tensor, guidance_scale: float) -> str | None:
    if e_u.dim() != 4 or e_p.shape != e_u.shape:
        return f"e_u and e_p must be (B, C, H, W) alike, got {tuple(e_u.shape)} and {tuple(e_p.shape)}"
    if e_s.dim() != 5 or e_s.shape[0] != e_u.shape[0] or e_s.shape[2:] != e_u.shape[1:]:
        return f"e_s must be (B, N, C, H, W) matching e_u {tuple(e_u.shape)}, got {tuple(e_s.shape)}"
    return _dtype_problem(e_u, e_p, e_s) or _device_problem(e_u, e_p, e_s)


def phase2_step_problem(e_u: Tensor, e_p: Tensor, e_s: Tensor, strength: Tensor, guidance_scale: float, q: float,
                        pixel_scores: Tensor | None = None) -> str | None:
    if e_u.dim() != 4 or e_p.shape != e_u.shape or e_s.shape != e_u.shape:
        return (f"e_u, e_p, e_s must be (B, C, H, W) alike, got {tuple(e_u.shape)}, {tuple(e_p.shape)}, "
                f"{tuple(e_s.shape)}")
    B, C, H, W = e_u.shape
    if C * H * W == 0:
        return f"needs at least one value per sample, got {tuple(e_u.shape)}"
    if strength.numel() != B:
        return f"strength must have one value per sample ({B}), got {tuple(strength.shape)}"
    if not 0.0 <= q <= 1.0:
        return f"q must be in [0, 1], got {q}"
    if pixel_scores is not None and pixel_scores.numel() != B * H * W:
        return f"pixel_scores must be (B, H*W) = {(B, H * W)}, got {tuple(pixel_scores.shape)}"
    extra = (strength,) if pixel_scores is None else (strength, pixel_scores)
    return _dtype_problem(e_u, e_p, e_s) or _device_problem(e_u, e_p, e_s, *extra)


PROBLEMS = {
    "cross_attention_aggregate": cross_attention_aggregate_problem,
    "phase1_step": phase1_step_problem,
    "phase2_step": phase2_step_problem,
}


def _require(op: str, problem: str | None) -> None:
    torch._check(problem is None, lambda: f"spguard::{op}: {problem}")


def cross_attention_aggregate_fake(q, k, token_mask):
    _require("cross_attention_aggregate", cross_attention_aggregate_problem(q, k, token_mask))
    return q.new_empty((q.shape[0], q.shape[2]), dtype=torch.float32)


def phase1_step_fake(e_u, e_p, e_s, guidance_scale):
    _require("phase1_step", phase1_step_problem(e_u, e_p, e_s, guidance_scale))
    B, N = e_s.shape[:2]
    f32 = dict(dtype=torch.float32, device=e_u.device)
    return (torch.empty_like(e_u, memory_format=torch.contiguous_format), torch.empty((B, N), **f32),
            torch.empty((B,), **f32), torch.empty((B, N), **f32))


def phase2_step_fake(e_u, e_p, e_s, strength, guidance_scale, q, pixel_scores):
    _require("phase2_step", phase2_step_problem(e_u, e_p, e_s, strength, guidance_scale, q, pixel_scores))
    return (torch.empty_like(e_u, memory_format=torch.contiguous_format),
            torch.empty_like(e_u, dtype=torch.float32, memory_format=torch.contiguous_format))


FAKES = {
    "cross_attention_aggregate": cross_attention_aggregate_fake,
    "phase1_step": phase1_step_fake,
    "phase2_step": phase2_step_fake,
}
for _name, _fake in FAKES.items():
    torch.library.register_fake(f"spguard::{_name}", _fake, lib=_LIBRARY)
