"""Export a training run's EMA weights as a diffusers-format model folder:
`python -m spguard.world.export --out runs/shapes --to spguard/models/shapes`.

The folder holds model_index.json and one save_pretrained sub-folder per component (unet,
text_encoder, tokenizer, scheduler, vae), plus spguard.json with the defaults a pipeline uses for
this model: the guidance scale that scored best in the run's latest evaluation (the stronger one on a
tie), the step count, image size, the default unsafe concepts (naming only some synonyms, so benchmarks
measure generalisation to the others) and SP-Guard knobs suited to the step count ("spguard").
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import sys
from pathlib import Path

import diffusers
import torch

from .model import (CHECKPOINT, DEFAULT_CONCEPTS, EVAL_LOG, Models, ModelSize, build_autoencoder, sampling_scheduler,
                    world_tokenizer)
from .scene import IMAGE_SIZE

SIZE_LIMIT_BYTES = 20 * 2**20  # the package ships the weights; above this they are stored in fp16
DEFAULT_INFERENCE_STEPS = 20
# The guidance SP-Guard's knobs below were tuned at: used when the run has no evaluation yet, and preferred when
# it ties for the best evaluation (train.EVAL_GUIDANCE_SCALES: measured).
DEFAULT_GUIDANCE_SCALE = 1.25
# SP-Guard's knobs for this model, chosen with benchmarks/tune_safety.py on prompts disjoint from the safety
# benchmark's (safety_bench.tuning_scenes, every case its own seed; 200 + 144 prompts x 2 seeds), at guidance
# 1.25, judged by the detector's colour and shape passes (docs/design.md, "The detector"), with DDIM not clipping
# x0 (model.sampling_scheduler; docs/design.md, "The sampler"). There SLD-max leaves 0.341 unsafe, and
# SLD-medium, which removes nothing (0.993), keeps every benign object at PSNR outside 47.9 dB. The concepts are
# model.DEFAULT_CONCEPTS. Rule: unsafe rate at most 0.05 above SLD-max's and benign unchanged >= 0.96 (a 0.01
# margin over the target), then the highest PSNR outside. Unsafe / PSNR outside / kept / benign unchanged, with
# the aligned mask's scores max(0, d_p . d_s) and the look-ahead (docs/design.md, "The aligned mask"):
# - At t_p 6 with Eq. 6's uniform P (chosen until the weighted P below): threshold 0.14, lambda_max 2.0,
#   guide_from 2, q 0.98: 0.370 / 53.5 dB / 0.993 / 0.965 (unchanged depends only on the threshold). q 0.97 / 0.99: 0.373 / 52.7 / 0.989, 0.467 / 55.6 / 0.996; q 0.98 at
#   lambda_max 3.0: 0.380 / 52.5 / 0.993. At q 0.97: lambda_max 4.0 0.370 / 50.3 / 0.993; guide_from 1 0.373 /
#   50.9 / 0.993; q 0.95 0.377 / 48.3 / 0.993. Thresholds 0.15 (lambda_max 3.0) / 0.16 / 0.16 (lambda_max 4.0):
#   0.402 / 53.0 / 0.993 / 0.971, 0.402 / 56.0 / 0.989 / 0.976, 0.399 / 53.8 / 0.993 / 0.976 (0.058-0.061 above
#   SLD-max); 0.16 with guide_from 1, lambda_max 4.0: 0.402 / 52.5 / 0.993.
#   Every setting within the margin is above SLD-medium's PSNR; none keeps every benign object.
# - Before these changes (scores |d_s| max(0, psi), the running sum from guide_from's own step): the chosen
#   setting 0.388 / 46.6 / 0.996 / 0.965, the guided images' PSNR 29.4 dB (40.4 with both changes); q 0.95 / 0.98: 0.384 /
#   44.0 / 0.989, 0.417 / 47.5 / 0.996; threshold 0.16, q 0.95: 0.409 / 47.9 / 0.989 / 0.976; q 0.9, lambda_max
#   1.0, threshold 0.22: 0.525 / 56.1 / 0.993 / 0.989. No setting then reached SLD-medium's PSNR within the margin.
# - Guiding every prompt (P plays no part): lambda_max 1.0 / 2.0 leave 0.279 / 0.272, below SLD-max, so what
#   separates SP-Guard from SLD-max is the unsafe prompts P leaves unguided (ROC AUC 0.969; benign P's 95th
#   percentile 0.108). With the current aligned mask (q 0.97): 0.214 / 40.5 / 0.986.
# Kept from before the sampler change (figures in docs/design.md): guide_from 2 (the gates: SLD-max
# started at step 2 removes 0.90 of what it removes from step 0, from step 6 only 0.23), the aligned mask, the
# cosine schedule (from lambda_max down to 1) and strength unscaled by P.
# P with steps weighted by 1/sd (docs/design.md, "Weighting P's steps"; weights printed by
# benchmarks/harmfulness_variants.py from the benign tuning prompts), t_p 7, the rest as above: thresholds 0.09 /
# 0.10 / 0.11 / 0.12 / 0.13 / 0.14 give 0.308 / 48.8 / 0.993 / 0.955, 0.330 / 50.3 / 0.993 / 0.968, 0.351 / 52.1 /
# 0.993 / 0.973, 0.362 / 53.2 / 0.993 / 0.976, 0.377 / 54.9 / 0.993 / 0.976, 0.399 / 56.5 / 0.993 / 0.981 (P's
# ROC AUC 0.979 against Eq. 6's 0.969 at t_p 6). Against the uniform mean at 0.14 (0.370 / 53.5 / 0.993 / 0.965),
# 0.12 is safer and leaves more benign prompts unchanged at the same PSNR. Rule for this choice: the benchmark's
# benign unchanged came out 0.024 below the tuning prompts' at the previous defaults, so half of each margin is
# kept: unsafe rate at most 0.025 above SLD-max's, benign unchanged >= 0.97, then the highest PSNR outside.
# Since the weights are fine-tuned with grounded cross-attention (3,000 steps, --attention-loss 0.02; docs/design.md,
# "Grounded cross-attention"): step weights again from benchmarks/harmfulness_variants.py (ROC AUC 0.977 at t_p 7),
# the same rule. SLD-max leaves 0.351 unsafe; SLD-medium keeps every benign object at PSNR outside 51.4 dB.
# Thresholds 0.10 / 0.12 / 0.14 / 0.15 / 0.16 / 0.18 give 0.264 / 48.5 / 0.993 / 0.952, 0.293 / 50.3 / 0.993 /
# 0.965, 0.312 / 51.6 / 0.993 / 0.973, 0.333 / 53.1 / 0.993 / 0.976, 0.351 / 54.5 / 0.993 / 0.976, 0.380 / 56.8 /
# 0.996 / 0.981: 0.16 is the highest within the margin.
SPGUARD_DEFAULTS = {"t_p": 7, "guide_from": 2, "harmfulness_threshold": 0.16, "mask": "aligned", "lambda_max": 2.0,
                    "q": 0.98, "schedule": "cosine", "scale_by_harmfulness": False,
                    "step_weights": [2.40, 1.07, 0.84, 0.80, 0.78, 0.73, 0.70]}
SPGUARD_CONFIG = "spguard.json"
COMPONENTS = {
    "unet": ["diffusers", "UNet2DConditionModel"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "scheduler": ["diffusers", "DDIMScheduler"],
    "vae": ["spguard.world", "PixelUnshuffleAutoencoder"],
}


def latest_evaluation(run_dir: Path) -> list[dict]:
    """The rows (one per guidance scale) of the run's latest evaluation, or [] if none."""
    path = run_dir / EVAL_LOG
    if not path.exists():
        return []
    with path.open(newline="") as f:
        rows = [{k: int(v) if k == "step" else float(v) for k, v in row.items()} for row in csv.DictReader(f)]
    last = max(r["step"] for r in rows)
    return [r for r in rows if r["step"] == last]


def evaluation_score(row: dict) -> tuple[float, bool, float]:
    """Benign objects right, unsafe prompts showing their object, benign prompts free of unsafe ones; ties go
    to the guidance SP-Guard's knobs were tuned at, then to the stronger one, since at guidance 1 CFG and a
    negative prompt do nothing."""
    score = row["benign_colour_place"] + row["unsafe_recall"] - row["benign_false_unsafe"]
    return score, row["guidance_scale"] == DEFAULT_GUIDANCE_SCALE, row["guidance_scale"]


def export(run_dir: Path, to_dir: Path) -> Path:
    checkpoint = torch.load(run_dir / CHECKPOINT, weights_only=False)
    tokenizer = world_tokenizer()
    models = Models(ModelSize.from_dict(checkpoint["settings"]["model_size"]), tokenizer)
    models.load_state_dict(checkpoint["ema"])
    if sum(p.numel() * p.element_size() for p in models.parameters()) > SIZE_LIMIT_BYTES:
        models.half()

    evaluation = latest_evaluation(run_dir)
    best = max(evaluation, key=evaluation_score) if evaluation else None
    defaults = {
        "guidance_scale": best["guidance_scale"] if best else DEFAULT_GUIDANCE_SCALE,
        "num_inference_steps": DEFAULT_INFERENCE_STEPS,
        "height": IMAGE_SIZE,
        "width": IMAGE_SIZE,
        "concepts": DEFAULT_CONCEPTS,
        "spguard": SPGUARD_DEFAULTS,
        "trained_steps": checkpoint["step"],
        "evaluation": best,
    }

    # Build beside the destination, then swap, so a failed export never leaves a half-written model.
    staging = to_dir.with_name(to_dir.name + ".export-tmp")
    shutil.rmtree(staging, ignore_errors=True)
    models.unet.save_pretrained(staging / "unet", safe_serialization=True)
    models.text_encoder.save_pretrained(staging / "text_encoder", safe_serialization=True)
    tokenizer.save_pretrained(staging / "tokenizer")
    sampling_scheduler().save_pretrained(staging / "scheduler")
    build_autoencoder().save_pretrained(staging / "vae")
    index = {"_class_name": "SafeDiffusionPipeline", "_diffusers_version": diffusers.__version__, **COMPONENTS}
    (staging / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    (staging / SPGUARD_CONFIG).write_text(json.dumps(defaults, indent=2) + "\n")
    # Swap: the old folder aside, the new one in, then the old one away. A crash between the renames
    # leaves the old model beside the destination (`.export-old`), never no model at all.
    old = to_dir.with_name(to_dir.name + ".export-old")
    shutil.rmtree(old, ignore_errors=True)
    if to_dir.exists():
        to_dir.rename(old)
    staging.rename(to_dir)
    shutil.rmtree(old, ignore_errors=True)
    return to_dir


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m spguard.world.export", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("runs/shapes"), help="the training run's folder")
    p.add_argument("--to", type=Path, default=Path("spguard/models/shapes"), help="model folder to write")
    args = p.parse_args(argv)
    print(export(args.out, args.to))
    return 0


if __name__ == "__main__":
    sys.exit(main())
