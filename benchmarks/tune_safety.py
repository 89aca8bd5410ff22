"""Grid search of SP-Guard's knobs on the shapes world's safety benchmark (how spguard.json's
"spguard" defaults were chosen).

    python benchmarks/tune_safety.py --grid '{"mask": ["noise", "attention"], "lambda_max": [1, 4]}'

Every combination of the grid's values (any SPGuard field: lambda_max, q, t_p, t_drop, schedule,
harmfulness_threshold, mask) runs on prompts built like the benchmark's but disjoint from them (another
scene seed, safety_bench.TUNE_SEED), against the same-seed CFG images; one row per combination, with SLD-max and SLD-medium as the reference rows the issue's target
names (unsafe rate at or below SLD-max's, preservation at or above SLD-medium's, benign unchanged).
Writes the rows to --out as CSV.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

import spguard.world  # noqa: F401 - model_index.json names this package for the vae component
from spguard.models import PACKAGED_MODEL
from spguard.methods import SPGuard
from spguard.pipeline import SafeDiffusionPipeline
from spguard.world import safety_bench

BENIGN_UNCHANGED_SHARE = 0.95  # the target share of benign prompts left exactly as CFG draws them
COLUMNS = ("unsafe_rate", "unsafe_named", "unsafe_unnamed", "benign_p95", "psnr_outside", "benign_kept", "benign_unchanged", "benign_change", "false_unsafe",
           "auc")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=PACKAGED_MODEL)
    p.add_argument("--grid", required=True, help="JSON object: SPGuard field -> list of values")
    p.add_argument("--seeds", type=int, default=2)
    safety_bench.add_tuning_arguments(p)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path("out/tune_safety.csv"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    grid = json.loads(args.grid)

    pipe = SafeDiffusionPipeline.from_pretrained(args.model)
    pipe.set_progress_bar_config(disable=True)
    run_args = SimpleNamespace(batch_size=64, steps=None, guidance_scale=None)
    scenes = safety_bench.tuning_scenes(args.benign, args.unsafe)
    cases = safety_bench.cases(scenes, args.seeds)

    def show(summary):
        print(f"{summary['method']:70s} " + " ".join(f"{c}={summary[c]:.3f}" for c in COLUMNS if c in summary),
              flush=True)
        return summary

    reference, _, _, cfg_row = safety_bench.run_method(pipe, "cfg", "cfg", cases, None, run_args)

    def row(name, method):
        _, _, per_image, summary = safety_bench.run_method(pipe, name, method, cases, reference, run_args)
        benign_p = [r["harmfulness"] for r in per_image if not r["unsafe_prompt"]]
        if not any(math.isnan(p) for p in benign_p):  # SP-Guard: where a threshold would leave 95% unguided
            summary["benign_p95"] = float(np.percentile(benign_p, BENIGN_UNCHANGED_SHARE * 100))
        return show(summary)

    rows = [show(cfg_row)] + [row(name, name) for name in ("sld-medium", "sld-max")]
    for values in itertools.product(*grid.values()):
        knobs = dict(zip(grid, values))
        rows.append(row(json.dumps(knobs), SPGuard.with_defaults(pipe.defaults.get("spguard"), **knobs)))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in rows for k in r)), restval="")
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
