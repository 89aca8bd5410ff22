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
DEFAULT_GUIDANCE_SCALE = 1.25  # used when the run has no evaluation yet (train.EVAL_GUIDANCE_SCALES: measured)
# SP-Guard's knobs for this model, chosen with benchmarks/tune_safety.py and benchmarks/diagnose_spguard.py on
# prompts disjoint from the safety benchmark's (48 benign + 36 unsafe, 2 seeds, unless said), on the world-v2
# weights at guidance 1.25, judged by the detector's colour and shape passes (docs/design.md, "The detector";
# README, "The embedded model"; the concepts are model.DEFAULT_CONCEPTS). Target rows on these prompts:
# SLD-max unsafe rate 0.667, SLD-medium PSNR outside 45.4 dB and benign objects kept 1.000.
# - t_p 5 (a quarter of the steps; the paper's share is a fifth): ROC AUC of P 0.965 at t_p 5 on 200 benign
#   and 36 unsafe tuning prompts x 2 seeds (0.932 at 4, 0.978 at 6).
# - mask: aligned, its scores summed over phase 2 (docs/design.md, "The aligned mask"). The noise mask (Eq. 8)
#   erases benign objects (kept 0.943 at q 0.93 and lambda_max 4, 0.914 at q 0.85, against aligned's 1.000 /
#   0.986); the attention mask has no signal, as this small model's cross-attention is nearly uniform over
#   the tokens (1.01x its image mean in the unsafe object's cell).
# - q 0.95, cosine schedule: strong guidance recolours the unsafe object instead of removing it (Eq. 7's
#   lambda(i) P+: unsafe rate 0.903 at lambda_max 64 and q 0.97; 0.792 at 4, 0.639 at 2, 0.750 at 1.5, all at
#   q 0.95). Strength near 1 inside the region cancels the concept's direction where the prompt draws what the
#   concept would, and the model draws background there. At lambda_max 2: q 0.9 / 0.95 / 0.97 give unsafe
#   0.681 / 0.639 / 0.792 and PSNR outside 45.6 / 50.6 / 54.6 dB; the step schedule 0.722 / 0.736.
# - scale_by_harmfulness False, lambda_max 0.75 (docs/design.md, "Strength"): P+ scaling steered prompts with
#   P 0.2-0.3 too weakly to remove anything and high-P prompts back into the object in inverse colours. Unsafe
#   rate, 48 + 36 tuning prompts (those not in the benchmark), 2 seeds: 0.729 / 0.614 / 0.571 / 0.529 / 0.600
#   at lambda_max 0.5 / 0.6 / 0.75 / 0.85 / 1.0 (scaled, lambda_max 2: 0.629; SLD-max 0.657), PSNR outside
#   53.2 / 50.9 / 48.8 / 47.0 / 46.0 dB (SLD-medium 45.4); on 120 + 54 tuning prompts: 0.491 / 0.557 / 0.632 at
#   0.75 / 0.85 / 1.0 (scaled, lambda_max 2: 0.602; SLD-max 0.557), PSNR 46.4 / 45.9 / 45.2 dB (SLD-medium 46.5).
#   On 96 + 72 tuning prompts (2 seeds): 0.521 / 0.657 / 0.779 at 0.75 / 1.0 / 1.25 with q 0.95, 0.614 / 0.743 /
#   0.800 with q 0.98 (SLD-max 0.564), PSNR 47.4 / 46.5 / 46.7 dB at q 0.95 (SLD-medium 46.3), kept 1.000 in
#   every row. Stronger is not safer: per prompt, removal flips with lambda_max (a perturbation of the
#   trajectory more than a push), and 7 of 79 guided unsafe images switch to the other unsafe class.
#   At lambda_max <= 1 the cosine schedule is constant (it ends at min(1, lambda_max)).
# - harmfulness_threshold 0.2: 0.979 of benign prompts unguided (0.974 on 100 benign prompts); at 0.28 the
#   unsafe rate rises to 0.736, more than 0.05 above SLD-max's. The paper's P+ > 0 rule would guide about a
#   third of benign prompts here, as benign P spreads around 0.
SPGUARD_DEFAULTS = {"t_p": 5, "harmfulness_threshold": 0.2, "mask": "aligned", "lambda_max": 0.75, "q": 0.95,
                    "schedule": "cosine", "scale_by_harmfulness": False}
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


def evaluation_score(row: dict) -> tuple[float, float]:
    """Benign objects right, unsafe prompts showing their object, benign prompts free of unsafe ones;
    ties go to the stronger guidance, since at guidance 1 CFG and a negative prompt do nothing."""
    return row["benign_colour_place"] + row["unsafe_recall"] - row["benign_false_unsafe"], row["guidance_scale"]


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
