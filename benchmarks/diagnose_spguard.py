"""Which term of SP-Guard fails on the shapes world? Measures each one on the tuning prompts (disjoint
from the safety benchmark's, benchmarks/tune_safety.py):

- P's separation: ROC AUC of the harmfulness P (Eq. 6), unsafe against benign prompts, and the share of
  benign prompts above the model's threshold;
- the mask against the objects the CFG image draws (its pixels snapped to the palette, as the detector
  does, pooled to latent cells): recall (share of the unsafe object's cells in the region R) and where
  the region lies (unsafe object / benign objects / background), at each phase-2 step, mean over guided
  unsafe prompts;
- with --objects, what carries P on benign prompts: its mean over single benign objects by shape and by
  colour (every shape x colour at three places), beside single unsafe objects.

    python benchmarks/diagnose_spguard.py --knobs '{"q": 0.97}'
    python benchmarks/diagnose_spguard.py --objects --seeds 4
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import spguard.world  # noqa: F401 - model_index.json names this package for the vae component
from spguard.evaluate import roc_auc
from spguard.jobs import to_pixels
from spguard.methods import SPGuard
from spguard.models import PACKAGED_MODEL
from spguard.pipeline import SafeDiffusionPipeline
from spguard.world import safety_bench
from spguard.world.detect import palette_labels
from spguard.world.scene import BENIGN_COLOURS, PALETTE, SHAPES, SYNONYMS, UNSAFE_COLOUR_NAMES, Scene, WorldObject

OBJECT_PLACES = ("left", "top right", "bottom")

# palette_labels' indices of the unsafe colours
UNSAFE_LABELS = [i for i, name in enumerate(PALETTE) if name in UNSAFE_COLOUR_NAMES.values()]


def object_cells(image: np.ndarray, factor: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(unsafe, benign) boolean maps at latent resolution: a cell holds an object when any of its
    pixels snaps to an unsafe (benign) palette colour."""
    labels = palette_labels(image)
    is_unsafe = np.isin(labels, UNSAFE_LABELS)
    unsafe = torch.from_numpy(is_unsafe).float()[None, None]
    benign = torch.from_numpy((labels >= 0) & ~is_unsafe).float()[None, None]
    return F.max_pool2d(unsafe, factor)[0, 0] > 0, F.max_pool2d(benign, factor)[0, 0] > 0


def p_by_object(pipe, method: SPGuard, seeds: int) -> None:
    """Mean P of one-object prompts, grouped by shape, by colour and by unsafe class."""
    objects = [WorldObject(shape, colour, place, shape) for shape in SHAPES for colour in BENIGN_COLOURS
               for place in OBJECT_PLACES]
    objects += [WorldObject(cls, UNSAFE_COLOUR_NAMES[cls], place, SYNONYMS[cls][0])
                for cls in UNSAFE_COLOUR_NAMES for place in OBJECT_PLACES]
    prompts = [Scene((o,)).caption for o in objects for _ in range(seeds)]
    never = dataclasses.replace(method, harmfulness_threshold=float("inf"))  # P measured, nothing guided
    out = pipe(prompts, method=never, seed=[k for _ in objects for k in range(seeds)], output_type="np")
    p = np.array([r.harmfulness for r in out.reports]).reshape(len(objects), seeds).mean(1)
    groups = {name: [o.kind == name or o.colour == name for o in objects] for name in (*SHAPES, *BENIGN_COLOURS)}
    groups.update({cls: [o.kind == cls for o in objects] for cls in UNSAFE_COLOUR_NAMES})
    print(f"mean P of one-object prompts ({len(OBJECT_PLACES)} places x {seeds} seeds), threshold "
          f"{method.harmfulness_threshold}: " + " ".join(f"{k}={p[np.array(v)].mean():.3f}" for k, v in groups.items()))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=PACKAGED_MODEL)
    p.add_argument("--knobs", default="{}", help="JSON object of SPGuard fields over the model's defaults")
    p.add_argument("--seeds", type=int, default=2)
    safety_bench.add_tuning_arguments(p)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--objects", action="store_true", help="only P of one-object prompts by shape and colour")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    pipe = SafeDiffusionPipeline.from_pretrained(args.model)
    pipe.set_progress_bar_config(disable=True)
    method = SPGuard.with_defaults(pipe.defaults.get("spguard"), **json.loads(args.knobs))
    if args.objects:
        return p_by_object(pipe, method, args.seeds)
    cases = safety_bench.cases(safety_bench.tuning_scenes(args.benign, args.unsafe), args.seeds)
    prompts = [c.scene.caption for c in cases]
    seeds = [c.seed for c in cases]
    factor = pipe.vae_scale_factor

    cfg = to_pixels(pipe(prompts, method="cfg", seed=seeds, output_type="np").images)
    masks = {}

    def collect(pipe_, i, t, kwargs):
        masks[i] = kwargs["guidance_mask"].clone()
        return {}

    out = pipe(prompts, method=method, seed=seeds, output_type="np", callback_on_step_end=collect,
               callback_on_step_end_tensor_inputs=["guidance_mask"])
    reports = out.reports
    p_values = [r.harmfulness for r in reports]
    labels = [c.unsafe for c in cases]
    benign_p = np.array([pv for pv, u in zip(p_values, labels) if not u])
    print(f"P: auc={roc_auc(p_values, labels):.3f} mean unsafe={np.mean([pv for pv, u in zip(p_values, labels) if u]):.3f} "
          f"benign={benign_p.mean():.3f} benign above threshold={np.mean(benign_p > method.harmfulness_threshold):.3f} "
          f"benign p95={np.percentile(benign_p, 95):.3f}")

    steps = sorted(i for i in masks if i >= method.t_p)
    rows = {i: [] for i in steps}
    for b, scene in enumerate(c.scene for c in cases):
        if not (scene.unsafe and reports[b].guided):
            continue
        unsafe, benign = object_cells(cfg[b], factor)
        if not unsafe.any():
            continue
        for i in steps:
            region = masks[i][b].amax(0) > 0  # a cell is in R when any channel is
            n = max(int(region.sum()), 1)
            rows[i].append((float((region & unsafe).sum() / unsafe.sum()), float((region & unsafe).sum()) / n,
                            float((region & benign & ~unsafe).sum()) / n, float(region.float().mean())))
    print(f"guided unsafe prompts with a drawn unsafe object: {len(rows[steps[0]]) if steps else 0}")
    print("step  recall  on_unsafe  on_benign  coverage")
    for i in steps:
        if rows[i]:
            r = np.mean(rows[i], 0)
            print(f"{i:4d}  {r[0]:.3f}   {r[1]:.3f}      {r[2]:.3f}      {r[3]:.3f}")


if __name__ == "__main__":
    main()
