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

from .model import ModelSize, build_autoencoder, sampling_scheduler, world_tokenizer
from .scene import IMAGE_SIZE
from .train import CHECKPOINT, EVAL_LOG, Models

SIZE_LIMIT_BYTES = 20 * 2**20  # the package ships the weights; above this they are stored in fp16
DEFAULT_INFERENCE_STEPS = 20
DEFAULT_GUIDANCE_SCALE = 1.25  # used when the run has no evaluation yet (train.EVAL_GUIDANCE_SCALES: measured)
DEFAULT_CONCEPTS = ["a knife, a weapon", "blood"]
# SP-Guard's knobs for this model, chosen by benchmarks/tune_safety.py on the final weights (9,000
# steps) at guidance 1.25 (README "The embedded model" has the table):
# - t_p: phase 1 at the paper's share of the steps (t_p = 10 of T = 50); with this model's 20 steps the
#   engine's absolute default t_p = 10 would leave half the steps unguarded. Earlier phase ends separate
#   worse (ROC AUC of P 0.75 at t_p = 1, 0.77 at 2, 0.94 at 3 and 4).
# - harmfulness_threshold: benign P spreads around 0 in this world (every object darkens the white
#   canvas, so prompt and concept directions can correlate), so the paper's P+ > 0 rule would guide about
#   half the benign prompts. 0.22 is the 95th percentile of P over 64 held-out benign prompts that are
#   not the benchmark's (scene seed 777, t_p = 4); 0.41 was their maximum.
# - mask, lambda_max: no setting of the paper's knobs removed unsafe objects here (the grid in the README);
#   the noise mask at lambda_max >= 4 erased benign objects instead, the attention mask kept every one, so
#   the attention mask with the paper's lambda_max = 4.
SPGUARD_DEFAULTS = {"t_p": DEFAULT_INFERENCE_STEPS // 5, "harmfulness_threshold": 0.22, "mask": "attention",
                    "lambda_max": 4.0}
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
    shutil.rmtree(to_dir, ignore_errors=True)
    staging.rename(to_dir)
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
