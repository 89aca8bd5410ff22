"""Command line: `spguard generate`, `spguard bench`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import methods

PACKAGED_MODEL = Path(__file__).parent / "models" / "shapes"  # the embedded default model (issue 4)


class UsageError(Exception):
    """Bad input: reported in one line, exit status 2."""


def _generate_parser(sub):
    p = sub.add_parser("generate", help="generate images (one PNG each) and a JSON report")
    p.add_argument("prompt", nargs="*", help="prompts; or give --prompts FILE")
    p.add_argument("--prompts", type=Path, help="a text file with one prompt per line")
    p.add_argument("--model", default=None,
                   help="a local diffusers-format folder, or 'tiny' for tiny random components "
                        "(default: the embedded model when installed, else tiny)")
    p.add_argument("--method", default="spguard", help=f"one of {', '.join(methods.METHOD_NAMES)}")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's)")
    p.add_argument("--guidance-scale", type=float, default=None, help="CFG scale (default: the model's)")
    p.add_argument("--seed", type=int, default=0, help="run seed; prompt k is drawn with seed + k")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--out", type=Path, default=Path("out"))
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")
    spg = p.add_argument_group("SP-Guard")
    spg.add_argument("--lambda-max", type=float, default=4.0)
    spg.add_argument("--q", type=float, default=0.9)
    spg.add_argument("--t-p", type=int, default=10)
    spg.add_argument("--mask", choices=("noise", "attention"), default="noise")
    spg.add_argument("--schedule", choices=("step", "cosine"), default="step")
    spg.add_argument("--concept", action="append", help="an unsafe concept (repeatable; default: the model's)")
    p.set_defaults(func=generate)


def _read_prompts(args) -> list[str]:
    prompts = list(args.prompt)
    if args.prompts is not None:
        if not args.prompts.is_file():
            raise UsageError(f"prompt file not found: {args.prompts}")
        try:
            prompts += [line.strip() for line in args.prompts.read_text(encoding="utf-8").splitlines()]
        except UnicodeDecodeError as exc:
            raise UsageError(f"{args.prompts}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
        prompts = [p for p in prompts if p]
    if not prompts:
        raise UsageError("no prompts given: pass prompts as arguments or --prompts FILE")
    return prompts


def _method(args):
    if args.method == "spguard":
        return methods.SPGuard(lambda_max=args.lambda_max, q=args.q, t_p=args.t_p, mask=args.mask,
                               schedule=args.schedule, concepts=args.concept)
    if args.method.startswith("sld-") and args.concept:
        return methods.SLD(args.method[4:], concept=", ".join(args.concept))
    return methods.resolve_method(args.method)


def load_pipeline(model: str | None, device: str | None = None):
    """The pipeline for --model: a folder, 'tiny', or (None) the embedded model if installed, else tiny."""
    import torch

    from .pipeline import SafeDiffusionPipeline
    from .testing import tiny_components

    if model is None:
        model = str(PACKAGED_MODEL) if (PACKAGED_MODEL / "model_index.json").is_file() else "tiny"
    if model == "tiny":
        pipe = SafeDiffusionPipeline.from_components(**tiny_components())
    else:
        pipe = SafeDiffusionPipeline.from_pretrained(model)
    return pipe.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def generate(args) -> int:
    from tqdm.auto import tqdm

    if args.steps is not None and args.steps < 1:
        raise UsageError(f"--steps must be at least 1, got {args.steps}")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {args.batch_size}")
    prompts = _read_prompts(args)
    method = _method(args)
    pipe = load_pipeline(args.model, args.device)
    pipe.set_progress_bar_config(disable=True)
    args.out.mkdir(parents=True, exist_ok=True)
    reports = []
    with tqdm(total=len(prompts), desc="images", unit="img") as progress:
        for start in range(0, len(prompts), args.batch_size):
            batch = prompts[start : start + args.batch_size]
            seeds = [args.seed + start + k for k in range(len(batch))]
            out = pipe(batch, method=method, num_inference_steps=args.steps, guidance_scale=args.guidance_scale,
                       seed=seeds)
            for k, (image, report) in enumerate(zip(out.images, out.reports)):
                name = f"{start + k:06d}.png"
                image.save(args.out / name)
                reports.append({"image": name, "seed": seeds[k], **report.to_dict()})
            progress.update(len(batch))
    (args.out / "report.json").write_text(json.dumps(reports, indent=1))
    guided = sum(r["guided"] for r in reports)
    print(f"wrote {len(reports)} images and report.json to {args.out} ({guided} guided)")
    return 0


def _bench_parser(sub):
    p = sub.add_parser("bench", help="benchmarks: fused ops and end to end (`spguard bench safety`: safety)")
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=bench)


def bench(args) -> int:
    if args.rest[:1] == ["safety"]:
        from .world import safety_bench

        return safety_bench.main(args.rest[1:])
    from . import bench as kernel_bench

    return kernel_bench.main(args.rest)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="spguard", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _generate_parser(sub)
    _bench_parser(sub)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (UsageError, ValueError, FileNotFoundError) as exc:
        print(f"spguard: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
