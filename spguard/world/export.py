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
# SP-Guard's knobs for this model, chosen with benchmarks/tune_safety.py on prompts disjoint from the safety
# benchmark's (safety_bench.tuning_scenes, every case its own seed), at guidance 1.25, judged by the detector's
# colour and shape passes (docs/design.md, "The detector"), by the rule "benign objects kept at SLD-medium's and
# benign unchanged >= 0.95, then the lowest unsafe rate". The concepts are model.DEFAULT_CONCEPTS.
# - harmfulness_threshold 0.24, chosen on the packaged weights (unsafe objects always named, docs/design.md
#   "Unsafe objects always named"). Unsafe / kept / unchanged on 200 + 144 tuning prompts x 2 seeds (SLD-max
#   0.768, SLD-medium kept 0.996) at 0.18 / 0.20 / 0.22 / 0.26: 0.583 / 1.000 / 0.939, 0.591 / 1.000 / 0.957,
#   0.609 / 1.000 / 0.973, 0.670 / 1.000 / 0.984. A lost benign object is rarer than one in those 288 images, so
#   on a draw four times larger (400 + 576 x 2; SLD-max 0.824, SLD-medium kept 1.000) 0.22 / 0.24 / 0.26 gave
#   0.669 / 0.995 / 0.957, 0.693 / 0.995 / 0.969, 0.723 / 0.996 / 0.975 (P's ROC AUC 0.931). No threshold keeps
#   every benign object, so kept does not choose; 0.24 is the lowest that leaves at least 0.96 of benign prompts
#   unchanged (a 0.01 margin, about what the draw of prompts moves it by).
# The other knobs were chosen on the previous weights (unsafe objects named with probability 0.97; SLD-max 0.801
# on the 200 + 144 prompts) and kept:
# - guide_from 2 (docs/design.md, "Guiding from before t_p"): P is still measured over steps 0-5, but guidance
#   starts at step 2. Unsafe / kept / unchanged at threshold 0.26 for guide_from 0 / 2 / 3 / 6 (6: the paper's
#   timing): 0.743 / 1.000 / 0.984, 0.725 / 1.000 / 0.984, 0.746 / 0.996 / 0.984, 0.888 / 0.993 / 0.984.
# - t_p 6: P's ROC AUC was 0.924 at t_p 6 (0.936 at 7). Eq. 6's uniform mean separates best of the definitions
#   tried (benchmarks/harmfulness_variants.py; docs/design.md, "The shapes world"). With guide_from 2 a longer
#   phase 1 no longer delays guidance: t_p 10 at threshold 0.34 gave 0.670 / 1.000 / 0.973 against t_p 6's
#   0.725, but on the benchmark (64 + 72 x 4) 0.736 against 0.747, at a higher cost for every benign prompt (20
#   steps: 60 UNet rows against 52, CFG 40): not worth it.
# - lambda_max 0.65, q 0.9 (the paper's), schedule cosine (constant at lambda_max <= 1: it ends at
#   min(1, lambda_max)). With guide_from 2 at threshold 0.24, lambda_max 0.5 / 0.85 gave 0.772 / 0.779 unsafe,
#   where 0.65 gave 0.674 / 0.725 at 0.22 / 0.26: stronger is not safer, as removal flips per prompt with the
#   strength.
# - mask: aligned (docs/design.md, "The aligned mask"). The noise mask (Eq. 8) erases benign objects next to the
#   unsafe one; the attention mask has no signal on this model (its cross-attention is uniform over the tokens).
# - scale_by_harmfulness False (docs/design.md, "Strength"): Eq. 7's P+ scaling steered prompts with P 0.2-0.3
#   too weakly to remove anything and high-P prompts back into the object in inverse colours.
# - The paper's P+ > 0 rule would guide about a third of benign prompts here, as benign P spreads around 0.
SPGUARD_DEFAULTS = {"t_p": 6, "guide_from": 2, "harmfulness_threshold": 0.24, "mask": "aligned", "lambda_max": 0.65,
                    "q": 0.9, "schedule": "cosine", "scale_by_harmfulness": False}
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
