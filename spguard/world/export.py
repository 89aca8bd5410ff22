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
# prompts disjoint from the safety benchmark's (safety_bench.tuning_scenes, 2 seeds), on the world-v2 weights
# at guidance 1.25, judged by the detector's colour and shape passes (docs/design.md, "The detector"; README,
# "The embedded model"; the concepts are model.DEFAULT_CONCEPTS).
# - t_p 6, harmfulness_threshold 0.26, q 0.9 (the paper's), lambda_max 0.65: chosen on 200 benign + 144
#   unsafe tuning prompts x 2 seeds (652 images) by the rule "benign objects kept and benign unchanged at
#   their targets, then the lowest unsafe rate" (SLD-max 0.569, SLD-medium kept 1.000 and PSNR 45.9 dB there).
#   P's ROC AUC there: 0.950 at t_p 5, 0.971 at 6, 0.977 at 7 (uniform mean of Eq. 6; weighting later steps,
#   cosines over windows or over the largest |d_s| separate worse: benchmarks/harmfulness_variants.py). Rows
#   (t_p, threshold, q, lambda_max: unsafe / kept / unchanged): 5, 0.2, 0.95, 0.75 (the previous defaults):
#   0.638 / 0.993 / 0.941; 5, 0.26: 0.696 / 0.993 / 0.971; 6, 0.2: 0.645 / 1.000 / 0.923; 6, 0.26, 0.95, 0.75:
#   0.670 / 1.000 / 0.968; 6, 0.26, 0.9, 0.65: 0.645 / 1.000 / 0.968 (PSNR outside 50.5 dB); 0.9, 0.75: 0.630 /
#   0.993; 0.9, 0.85: 0.667 / 0.993; 0.9, 0.5: 0.761; 0.85, 0.65: 0.645 / 1.000 (49.3 dB); 0.85, 0.75: 0.641 /
#   0.993. Guiding each guided prompt away from both concepts (not only the most similar one) was worse: 0.692
#   and 0.678 against 0.670 and 0.638. On 96 + 72 tuning prompts earlier: 0.521 / 0.657 / 0.779 at lambda_max
#   0.75 / 1.0 / 1.25 with q 0.95 (SLD-max 0.564): stronger is not safer (per prompt, removal flips with
#   lambda_max, a perturbation of the trajectory more than a push; 7 of 79 guided unsafe images switched to
#   the other unsafe class). At lambda_max <= 1 the cosine schedule is constant (it ends at min(1, lambda_max)).
#   Those rows had seeds 0-1 shared by all prompts; re-measured with every case its own seed (safety_bench.cases;
#   SLD-max 0.801, SLD-medium kept 1.000 / 46.7 dB), t_p 6, q 0.9, lambda_max 0.65, threshold 0.14 / 0.18 / 0.22
#   / 0.26: unsafe 0.848 / 0.851 / 0.873 / 0.888, kept 0.989 / 0.989 / 0.989 / 0.993, unchanged 0.883 / 0.936 /
#   0.973 / 0.984; lambda_max 0.85 within 0.011 of each, t_p 7 0.015-0.026 higher; so the defaults stand.
# - mask: aligned, its scores summed over phase 2 (docs/design.md, "The aligned mask"). The noise mask (Eq. 8)
#   erases benign objects (kept 0.943 at q 0.93 and lambda_max 4, 0.914 at q 0.85, against aligned's 1.000 /
#   0.986); the attention mask has no signal, as this small model's cross-attention is nearly uniform over
#   the tokens (1.01x its image mean in the unsafe object's cell).
# - scale_by_harmfulness False (docs/design.md, "Strength"): Eq. 7's P+ scaling steered prompts with P 0.2-0.3
#   too weakly to remove anything and high-P prompts back into the object in inverse colours (48 + 36 tuning
#   prompts: unsafe 0.629 scaled at lambda_max 2 against 0.571 unscaled at 0.75; SLD-max 0.657).
# - The paper's P+ > 0 rule would guide about a third of benign prompts here, as benign P spreads around 0.
SPGUARD_DEFAULTS = {"t_p": 6, "harmfulness_threshold": 0.26, "mask": "aligned", "lambda_max": 0.65, "q": 0.9,
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
