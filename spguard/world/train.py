"""Train the shapes world's text-to-image model from scratch: `python -m spguard.world.train`.

Renders training scenes on the fly (never a held-out one), trains text encoder and UNet together with
v-prediction and caption dropout (for classifier-free guidance), optionally with a loss that grounds the named
objects' tokens' cross-attention on them (--attention-loss, grounding.py), keeps EMA weights, and every
--eval-every steps samples held-out prompts with the EMA weights and scores them with the world's
detector (written to OUT/eval.csv). Checkpoints (model, EMA, optimizer, RNG states, step) go to
OUT/checkpoint.pt every few minutes, atomically; rerunning the same command resumes from it with the
settings it was started with (only --steps and --threads may change). Deterministic for a seed.

`--evaluate` scores the checkpoint's EMA weights now (e.g. a finished run after a change to the
evaluation), replacing that step's rows of OUT/eval.csv. `--export --to DIR` writes the EMA weights as a
diffusers-format model folder (see export.py).
"""

from __future__ import annotations

import argparse
import copy
import csv
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from . import gates
from .detect import detect
from .grounding import GroundingAttention, grounding_loss, grounding_targets
from .model import (
    CHECKPOINT,
    DEFAULT_CONCEPTS,
    EVAL_LOG,
    LOSS_LOG,
    MAX_TOKENS,
    Models,
    ModelSize,
    build_autoencoder,
    encode_prompts,
    images_to_latents,
    sample,
    sampling_scheduler,
    train_scheduler,
    world_tokenizer,
)
from .scene import BENIGN_NAMED_PROBABILITY, UNSAFE_NAMED_PROBABILITY, render_batch, sample_scene

LOSS_LOG_EVERY = 50  # steps between rows of the loss log
EVAL_SEED = 1234  # the evaluation prompts and their noise are fixed, so evaluations compare over time
# Measured on the packaged weights (9,000 steps), 96 held-out prompts: benign objects in colour and place /
# unsafe recall / false unsafe were 100% / 100% / 0% at guidance 1.0 and 1.25, 99% / 81% / 3% at 1.5 and
# 45% / 50% / 14% at 2.0 (at 3 and 4 colours leave the palette). docs/design.md's "2-4 looked better" was
# seen at 1.5k steps and does not hold for the trained model.
EVAL_GUIDANCE_SCALES = (1.0, 1.25, 1.5, 2.0)
EVAL_UNSAFE_SHARE = 1 / 3
EMA_WARMUP = 10  # EMA decay ramps as (1 + step) / (EMA_WARMUP + step) so early weights fade fast
FINAL_LR_SHARE = 0.1  # cosine decay of the learning rate ends at this share of the peak
GRAD_CLIP = 1.0
# About 2.7 h at batch 64 on 2 free cores (docs/design.md, "Training the shapes model": ~60 images/s for
# this model size).
DEFAULT_STEPS = 9000
# Settings fixed when a run starts; a resumed run takes them from its checkpoint.
RUN_SETTINGS = ("batch_size", "seed", "lr", "warmup", "ema_decay", "caption_dropout", "eval_every",
                "eval_prompts", "eval_steps", "init_from", "gate_prompts", "benign_named", "unsafe_named",
                "attention_loss")
# The gates (gates.py) are measured at the packaged model's guidance scale and the paper's share of the
# steps for t_p (t_p = 10 of T = 50).
GATES_GUIDANCE_SCALE = 1.25
GATES_LOG = "gates.csv"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m spguard.world.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("runs/shapes"), help="checkpoint and log folder")
    p.add_argument("--steps", type=int, default=None, help=f"total optimizer steps (default {DEFAULT_STEPS})")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2,
                   help="torch CPU threads (on a CPU shared with other work 1 is faster: measured 2.6 s/step "
                   "against 16 s/step with 2, as a second thread waits for a busy core)")
    p.add_argument("--lr", type=float, default=8e-4)
    p.add_argument("--warmup", type=int, default=200, help="linear learning-rate warmup steps")
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--caption-dropout", type=float, default=0.1, help="share of empty captions (for CFG)")
    p.add_argument("--benign-named", type=float, default=BENIGN_NAMED_PROBABILITY,
                   help="probability that a training caption names a benign object (a world variant to try)")
    p.add_argument("--unsafe-named", type=float, default=UNSAFE_NAMED_PROBABILITY,
                   help="probability that a training caption names an unsafe object (a world variant to try)")
    p.add_argument("--attention-loss", type=float, default=0.0,
                   help="weight of the token-grounding loss on cross-attention (grounding.py; 0: off)")
    p.add_argument("--eval-every", type=int, default=500, help="steps between evaluations (0: never)")
    p.add_argument("--eval-prompts", type=int, default=24)
    p.add_argument("--eval-steps", type=int, default=20, help="DDIM steps of evaluation samples")
    p.add_argument("--gate-prompts", type=int, default=16,
                   help="unsafe and benign held-out prompts (each) of the diagnostic gates at every evaluation (0: none)")
    p.add_argument("--init-from", default=None,
                   help="a model folder (e.g. spguard/models/shapes) whose UNet and text encoder start the run: "
                        "a fine-tune instead of training from scratch")
    p.add_argument("--checkpoint-minutes", type=float, default=5.0)
    p.add_argument("--unet-channels", default="32,64,128", help="UNet block widths, comma-separated")
    p.add_argument("--layers-per-block", type=int, default=1)
    p.add_argument("--text-width", type=int, default=128)
    p.add_argument("--text-layers", type=int, default=3)
    p.add_argument("--attention-heads", type=int, default=4)
    p.add_argument("--evaluate", action="store_true", help="evaluate the checkpoint's EMA weights and exit")
    p.add_argument("--export", action="store_true", help="export the checkpoint's EMA weights and exit")
    p.add_argument("--to", type=Path, default=Path("spguard/models/shapes"), help="--export destination")
    return p.parse_args(argv)


def model_size(args: argparse.Namespace) -> ModelSize:
    return ModelSize(
        unet_channels=tuple(int(c) for c in args.unet_channels.split(",")),
        layers_per_block=args.layers_per_block,
        text_width=args.text_width,
        text_layers=args.text_layers,
        attention_heads=args.attention_heads,
    )


def learning_rate(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (FINAL_LR_SHARE + (1 - FINAL_LR_SHARE) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, step: int, max_decay: float) -> None:
    decay = min(max_decay, (1 + step) / (EMA_WARMUP + step))
    for e, m in zip(ema.parameters(), model.parameters()):
        e.lerp_(m, 1 - decay)


def eval_prompts(n: int) -> list[tuple]:
    """Fixed held-out scenes (never trained on as a whole) with their noise seeds."""
    rng = np.random.default_rng(EVAL_SEED)
    n_unsafe = round(n * EVAL_UNSAFE_SHARE)
    scenes = [sample_scene(rng, held_out=True, unsafe=i < n_unsafe) for i in range(n)]
    return [(scene, EVAL_SEED + i) for i, scene in enumerate(scenes)]


def score(scenes: list, images: np.ndarray) -> dict[str, float]:
    """The issue's quality measures: requested benign objects present with the right colour and
    place (and also the right shape), unsafe prompts showing their unsafe class, benign prompts
    showing any unsafe object."""
    benign_total = colour_place = exact = unsafe_prompts = unsafe_hits = benign_prompts = false_unsafe = 0
    for scene, image in zip(scenes, images):
        found = detect(image)
        seen = {(d.colour, d.place) for d in found}
        keys = {d.key for d in found}
        for obj in scene.objects:
            if not obj.unsafe:
                benign_total += 1
                colour_place += (obj.colour, obj.place) in seen
                exact += obj.key in keys
        if scene.unsafe:
            unsafe_prompts += 1
            wanted = {o.kind for o in scene.objects if o.unsafe}
            unsafe_hits += any(d.kind in wanted for d in found)
        else:
            benign_prompts += 1
            false_unsafe += any(d.unsafe for d in found)
    return {
        "benign_colour_place": colour_place / max(1, benign_total),
        "benign_exact": exact / max(1, benign_total),
        "unsafe_recall": unsafe_hits / max(1, unsafe_prompts),
        "benign_false_unsafe": false_unsafe / max(1, benign_prompts),
    }


def evaluate(ema: Models, tokenizer, vae, args) -> list[dict]:
    ema.eval()
    prompts = eval_prompts(args.eval_prompts)
    scenes = [s for s, _ in prompts]
    rows = []
    for guidance in EVAL_GUIDANCE_SCALES:
        images = sample(ema.unet, ema.text_encoder, tokenizer, vae, [s.caption for s in scenes],
                        [seed for _, seed in prompts], guidance, args.eval_steps)
        rows.append({"guidance_scale": guidance, **score(scenes, images)})
    return rows


def append_csv(path: Path, row: dict) -> None:
    new = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)


def drop_rows_from(path: Path, step: int) -> None:
    """Forget the rows of `step` and later: a run that died after its last checkpoint logged steps it
    will now redo, and a re-evaluation replaces its step's rows."""
    if path.exists():
        with path.open(newline="") as f:
            rows = list(csv.DictReader(f))
        if rows and int(rows[-1]["step"]) >= step:
            path.unlink()
            for row in rows:
                if int(row["step"]) < step:
                    append_csv(path, row)


def log_evaluation(ema: Models, tokenizer, vae, args, step: int, write=print) -> None:
    for row in evaluate(ema, tokenizer, vae, args):
        row = {"step": step, **{k: round(v, 4) for k, v in row.items()}}
        append_csv(args.out / EVAL_LOG, row)
        write(f"eval {row}")
    if args.gate_prompts:
        from ..pipeline import SafeDiffusionPipeline

        pipe = SafeDiffusionPipeline.from_components(
            unet=ema.unet, text_encoder=ema.text_encoder, tokenizer=tokenizer, vae=vae,
            scheduler=sampling_scheduler(), defaults={"guidance_scale": GATES_GUIDANCE_SCALE,
                                                      "num_inference_steps": args.eval_steps,
                                                      "concepts": DEFAULT_CONCEPTS})
        pipe.set_progress_bar_config(disable=True)
        found = gates.measure(pipe, args.gate_prompts, args.gate_prompts, t_p=max(1, args.eval_steps // 5))
        append_csv(args.out / GATES_LOG, {"step": step, **{k: round(v, 4) for k, v in found.items()}})
        write(f"gates step {step}: {gates.format_gates(found)}")


def initial_weights(models: Models, folder: str) -> None:
    """Start from a model folder's UNet and text encoder (a fine-tune)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    models.unet.load_state_dict(UNet2DConditionModel.from_pretrained(Path(folder) / "unet").float().state_dict())
    models.text_encoder.load_state_dict(CLIPTextModel.from_pretrained(Path(folder) / "text_encoder").float().state_dict())


def save_checkpoint(path: Path, state: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # atomic: a crash mid-save leaves the previous checkpoint intact


def train(args: argparse.Namespace) -> None:
    torch.set_flush_denormal(True)  # denormals randomly slowed CPU steps from ~1 s to 10-24 s
    torch.set_num_threads(args.threads)
    ckpt_path = args.out / CHECKPOINT
    if args.evaluate and not ckpt_path.exists():
        raise SystemExit(f"--evaluate: no checkpoint at {ckpt_path}")
    args.out.mkdir(parents=True, exist_ok=True)
    checkpoint = torch.load(ckpt_path, weights_only=False) if ckpt_path.exists() else None
    if checkpoint:
        settings = checkpoint["settings"]
        for name in RUN_SETTINGS:
            setattr(args, name, settings.get(name, getattr(args, name)))
        size = ModelSize.from_dict(settings["model_size"])
        args.steps = args.steps or settings["steps"]
    else:
        size = model_size(args)
        args.steps = args.steps or DEFAULT_STEPS
    settings = {**{n: getattr(args, n) for n in RUN_SETTINGS}, "steps": args.steps, "model_size": size.to_dict()}

    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    tokenizer = world_tokenizer()
    vae = build_autoencoder()
    models = Models(size, tokenizer)
    if args.init_from and not checkpoint:
        initial_weights(models, args.init_from)
    ema = copy.deepcopy(models).requires_grad_(False)
    grounding_capture = GroundingAttention(models.unet) if args.attention_loss else None  # after the copy: not on EMA
    optimizer = torch.optim.AdamW(models.parameters(), lr=args.lr, weight_decay=0.01)
    step, elapsed = 0, 0.0
    if checkpoint:
        models.load_state_dict(checkpoint["model"])
        ema.load_state_dict(checkpoint["ema"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        torch.set_rng_state(checkpoint["torch_rng"])
        rng.bit_generator.state = checkpoint["numpy_rng"]
        step, elapsed = checkpoint["step"], checkpoint["elapsed"]
        for log in (LOSS_LOG, EVAL_LOG, GATES_LOG):
            drop_rows_from(args.out / log, step + 1)
        print(f"resuming {ckpt_path} at step {step}/{args.steps}", file=sys.stderr)
    n_params = sum(p.numel() for p in models.parameters())
    print(f"{n_params / 1e6:.2f}M parameters, settings {settings}", file=sys.stderr)

    if args.evaluate:
        for log in (EVAL_LOG, GATES_LOG):
            drop_rows_from(args.out / log, step)
        log_evaluation(ema, tokenizer, vae, args, step)
        return

    def state() -> dict:
        return {"step": step, "elapsed": elapsed, "settings": settings, "model": models.state_dict(),
                "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
                "torch_rng": torch.get_rng_state(), "numpy_rng": rng.bit_generator.state}

    noise_schedule = train_scheduler()
    models.train()
    last_save = time.monotonic()
    losses: list[float] = []
    grounding: list[float] = []
    bar = tqdm(total=args.steps, initial=step, mininterval=10, dynamic_ncols=True)
    while step < args.steps:
        started = time.monotonic()
        batch = render_batch(rng, args.batch_size, args.benign_named, args.unsafe_named)
        dropped = rng.random(args.batch_size) < args.caption_dropout
        captions = ["" if d else c for c, d in zip(batch.captions, dropped)]
        latents = images_to_latents(batch.images, vae)
        noise = torch.randn_like(latents)
        t = torch.randint(0, noise_schedule.config.num_train_timesteps, (args.batch_size,))
        noisy = noise_schedule.add_noise(latents, noise, t)
        target = noise_schedule.get_velocity(latents, noise, t)
        context = encode_prompts(models.text_encoder, tokenizer, captions)
        if grounding_capture is not None:
            rows, token_mask, object_mask = grounding_targets(batch.scenes, captions, batch.masks, tokenizer, MAX_TOKENS)
            grounding_capture.begin(rows, token_mask)
        loss = F.mse_loss(models.unet(noisy, t, encoder_hidden_states=context).sample, target)
        if grounding_capture is not None:
            term = grounding_loss(grounding_capture.take(), object_mask)
            loss = loss + args.attention_loss * term
            grounding.append(term.item())
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args.steps, args.lr, args.warmup)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(models.parameters(), GRAD_CLIP)
        optimizer.step()
        update_ema(ema, models, step, args.ema_decay)
        step += 1
        elapsed += time.monotonic() - started
        losses.append(loss.item())
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if step % LOSS_LOG_EVERY == 0 or step == args.steps:
            row = {"step": step, "loss": float(np.mean(losses)), "train_seconds": round(elapsed, 1)}
            if grounding:  # the total loss above includes it, weighted
                row["grounding_loss"] = float(np.mean(grounding))
            append_csv(args.out / LOSS_LOG, row)
            losses.clear()
            grounding.clear()
        if args.eval_every and (step % args.eval_every == 0 or step == args.steps):
            log_evaluation(ema, tokenizer, vae, args, step, bar.write)
        if step == args.steps or time.monotonic() - last_save > 60 * args.checkpoint_minutes:
            save_checkpoint(ckpt_path, state())
            last_save = time.monotonic()
    bar.close()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.export:
        from .export import export

        export(args.out, args.to)
        return 0
    train(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
