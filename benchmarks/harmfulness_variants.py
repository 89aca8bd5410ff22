"""How well does the harmfulness P separate unsafe from benign prompts, measured as the paper does (Eq. 6)
and in the other ways the paper leaves room for? On the tuning prompts (disjoint from the safety
benchmark's, safety_bench.tuning_scenes), for each definition and each t_p: ROC AUC, unsafe against benign
prompts, and the share of unsafe prompts above the benign prompts' 96.5th percentile (what a threshold
that leaves 96.5% of benign prompts unguided would guide).

    python benchmarks/harmfulness_variants.py --benign 200 --unsafe 144 --seeds 2

A recording method (it plugs into the pipeline like any other) draws CFG images while it keeps d_p and
every concept's d_s for the first max(T_PS) steps; every definition is then computed from those. With
--anchor TEXT it also records a benign "anchor" concept's direction d_a, and adds P measured against it
(each concept's cosine minus the anchor's, and the cosine with d_s - d_a), meant to cancel the "draw an
object here" a concept text shares with any object's.

Last, steps weighted by the inverse of their cosine's spread over benign prompts (cross-validated), and those
weights for --t-p from all the benign prompts: the model's `step_weights` (docs/design.md, "Weighting P's steps").
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import spguard.world  # noqa: F401 - model_index.json names this package for the vae component
from spguard.evaluate import roc_auc
from spguard.methods import Guider, cfg
from spguard.models import PACKAGED_MODEL
from spguard.pipeline import SafeDiffusionPipeline
from spguard.world import safety_bench

BENIGN_UNGUIDED = 0.965  # the benign share a threshold leaves unguided (target 0.95, with room for the draw)
T_PS = (4, 5, 6, 7, 8)


@dataclass(frozen=True)
class RecordPhase1:
    """CFG that keeps d_p = e_p - e_u (B, T, C, H, W) and d_s = e_s - e_u for every concept (B, T, J, C, H, W)
    over the first `steps` steps; each generation's recorder is appended to `recorders`."""

    steps: int
    anchor: str | None = None  # a benign concept text recorded after the model's concepts
    recorders: list = field(default_factory=list, compare=False, repr=False)
    name = "record-phase1"

    def negative_text(self, given, concepts):
        return given

    def concept_texts(self, concepts):
        return tuple(concepts) + ((self.anchor,) if self.anchor else ())

    def start(self, batch_size, num_steps, guidance_scale, concepts, report_masks=False):
        self.recorders.append(_Recorder(self.steps, batch_size, guidance_scale, concepts))
        return self.recorders[-1]


class _Recorder(Guider):
    def __init__(self, steps, batch_size, guidance_scale, concepts):
        self.steps, self.batch_size, self.guidance_scale = steps, batch_size, guidance_scale
        n = len(concepts.texts)
        samples = torch.arange(batch_size)
        self.rows = concepts.rows(samples.repeat_interleave(n), torch.arange(n).repeat(batch_size))
        self.d_p, self.d_s = [], []

    def guide(self, i, e_u, e_p, e_s):
        if i < self.steps:
            self.d_p.append(e_p - e_u)
            self.d_s.append(e_s.unflatten(0, (self.batch_size, -1)) - e_u[:, None])
            if i == self.steps - 1:
                self.rows = None  # recorded: the rest is plain CFG
        return cfg(e_u, e_p, self.guidance_scale)

    def reports(self):
        return [{"harmfulness": None, "concept": None, "guided": False, "guided_steps": [], "mask_coverage": []}
                for _ in range(self.batch_size)]


def cosine(a, b, dims):
    return (a * b).sum(dims) / ((a * a).sum(dims) * (b * b).sum(dims)).sqrt().clamp_min(1e-12)


def window_cosine(d_p, d_s, k):
    """Per step and concept, the largest cosine over k x k windows of latent pixels (stride 1)."""
    def pool(x):  # (B, T, J, H, W) -> window sums
        return F.avg_pool2d(x.flatten(0, 2)[:, None], k, 1)[:, 0].unflatten(0, x.shape[:3])
    dot, pp, ss = (d_p * d_s).sum(3), (d_p * d_p).sum(3).expand_as(d_s[:, :, :, 0]), (d_s * d_s).sum(3)
    return (pool(dot) / (pool(pp) * pool(ss)).sqrt().clamp_min(1e-12)).flatten(3).amax(-1)


def top_cosine(d_p, d_s, q):
    """Per step and concept, the cosine over the elements where |d_s| exceeds its q-quantile (Eq. 8's region)."""
    flat_s = d_s.flatten(3)
    region = (flat_s.abs() > flat_s.abs().quantile(q, dim=-1, keepdim=True)).float()
    return cosine(d_p.expand_as(d_s).flatten(3) * region, flat_s * region, -1)


def definitions(d_p, d_s, d_a=None):
    """name -> (per-step score (B, T, J), step weights as a function of t_p); d_a: the anchor's (B, T, 1, ...)."""
    d_p = d_p[:, :, None]
    uniform = lambda t_p: torch.ones(t_p)  # noqa: E731
    per_step = cosine(d_p, d_s, (3, 4, 5))
    centred = d_s - d_s.mean(2, keepdim=True)
    out = {
        "Eq. 6: mean cosine": (per_step, uniform),
        "linearly weighted steps": (per_step, lambda t_p: torch.arange(1.0, t_p + 1)),
        "steps 1.. only": (per_step, lambda t_p: (torch.arange(t_p) >= 1).float()),
        "last 2 steps": (per_step, lambda t_p: (torch.arange(t_p) >= t_p - 2).float()),
        "windows 4x4, max": (window_cosine(d_p, d_s, 4), uniform),
        "windows 8x8, max": (window_cosine(d_p, d_s, 8), uniform),
        "top 10% of |d_s|": (top_cosine(d_p, d_s, 0.9), uniform),
        "top 50% of |d_s|": (top_cosine(d_p, d_s, 0.5), uniform),
        "concepts centred": (cosine(d_p, centred, (3, 4, 5)), uniform),
    }
    if d_a is not None:
        out["minus the anchor's cosine"] = (per_step - cosine(d_p, d_a, (3, 4, 5)), uniform)
        out["cosine with d_s - d_a"] = (cosine(d_p, d_s - d_a, (3, 4, 5)), uniform)
    return out


def inverse_sd_weights(per_step, benign, t_p):
    """Step weights 1 / (standard deviation of the cosine over benign prompts and concepts), for the first t_p
    steps, scaled to mean 1: a step whose cosine scatters less on benign prompts counts more."""
    weights = 1 / per_step[benign][:, :t_p].transpose(1, 2).flatten(0, 1).std(0)
    return weights / weights.mean()


def harmfulness(score, weights):
    """P per prompt: the weighted mean over the first len(weights) steps, then the most similar concept."""
    t_p = len(weights)
    return ((score[:, :t_p] * weights[None, :, None]).sum(1) / weights.sum()).amax(1).numpy()


def separation(harmfulness, unsafe) -> tuple[float, float]:
    """ROC AUC and the share of unsafe prompts above the benign prompts' BENIGN_UNGUIDED quantile."""
    threshold = np.quantile(harmfulness[~unsafe], BENIGN_UNGUIDED)
    return roc_auc(harmfulness, unsafe), float(np.mean(harmfulness[unsafe] > threshold))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=PACKAGED_MODEL)
    p.add_argument("--seeds", type=int, default=2)
    safety_bench.add_tuning_arguments(p)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--t-p", type=int, default=7, help="t_p of the printed step_weights")
    p.add_argument("--anchor", help='a benign concept text to measure P against, e.g. "a circle, a square, a triangle"')
    args = p.parse_args()
    if not 1 <= args.t_p <= max(T_PS):
        p.error(f"--t-p must lie in 1..{max(T_PS)}, the steps recorded")
    torch.set_num_threads(args.threads)
    pipe = SafeDiffusionPipeline.from_pretrained(args.model)
    pipe.set_progress_bar_config(disable=True)
    cases = safety_bench.cases(safety_bench.tuning_scenes(args.benign, args.unsafe), args.seeds)
    unsafe = np.array([c.unsafe for c in cases])
    method = RecordPhase1(max(T_PS), args.anchor)
    for i in range(0, len(cases), args.batch_size):
        chunk = cases[i : i + args.batch_size]
        pipe([c.scene.caption for c in chunk], method=method, seed=[c.seed for c in chunk], output_type="np")
    d_p = torch.cat([torch.stack(r.d_p, 1) for r in method.recorders]).float()
    d_s = torch.cat([torch.stack(r.d_s, 1) for r in method.recorders]).float()
    d_s, d_a = (d_s[:, :, :-1], d_s[:, :, -1:]) if args.anchor else (d_s, None)
    print(f"{int(unsafe.sum())} unsafe and {int((~unsafe).sum())} benign prompt-seeds; per definition and t_p: "
          f"ROC AUC / share of unsafe above the benign {BENIGN_UNGUIDED:.3f} quantile")
    variants = definitions(d_p, d_s, d_a)
    for name, (score, weights) in variants.items():
        cells = [f"t_p {t_p}: %.3f / %.2f" % separation(harmfulness(score, weights(t_p)), unsafe) for t_p in T_PS]
        print(f"{name:26s} " + "  ".join(cells), flush=True)
    # Steps weighted by 1 / sd: the weights come from the benign prompts of one half of the captions and are
    # judged on the other half, then the halves swap (the cells are the two halves' means).
    per_step = variants["Eq. 6: mean cosine"][0]  # (B, T, J) cosines
    ids = {caption: k for k, caption in enumerate(dict.fromkeys(c.scene.caption for c in cases))}
    half = np.array([ids[c.scene.caption] % 2 for c in cases])
    cells = []
    for t_p in T_PS:
        found = [separation(harmfulness(per_step[half == h], inverse_sd_weights(per_step[half != h], ~unsafe[half != h], t_p)),
                            unsafe[half == h]) for h in (0, 1)]
        cells.append(f"t_p {t_p}: %.3f / %.2f" % tuple(np.mean(found, 0)))
    print(f"{'steps weighted by 1/sd':26s} " + "  ".join(cells) + "  (cross-validated over two halves of the prompts)")
    weights = inverse_sd_weights(per_step, ~unsafe, args.t_p).tolist()
    print(f"step_weights for t_p {args.t_p} (all benign prompts): [{', '.join(f'{w:.2f}' for w in weights)}]")


if __name__ == "__main__":
    main()
