"""Command line: `spguard generate`, `spguard report`, `spguard eval`, `spguard bench`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import methods
from .jobs import WriteError
from .loading import ModelLoadError
from .models import PACKAGED_MODEL

SIGINT_STATUS = 130  # 128 + SIGINT, as shells report a job stopped by Ctrl-C
WRITE_FAILED_STATUS = 1  # the job stopped on a failed write (full disk, ...); bad input exits with 2


class UsageError(Exception):
    """Bad input: reported in one line, exit status 2."""


def _generate_parser(sub):
    p = sub.add_parser("generate", help="generate images (one PNG each) and their reports; resumes when rerun")
    p.add_argument("prompt", nargs="*", help="prompts; or give --prompts FILE")
    p.add_argument("--prompts", type=Path,
                   help="a .txt (one prompt per line), .csv (a 'prompt' column) or .jsonl file (\"prompt\" fields)")
    p.add_argument("--model", default=None,
                   help="a local diffusers-format folder, or 'tiny' for tiny random components "
                        "(default: the embedded model when installed, else tiny)")
    p.add_argument("--method", default="spguard", help=f"one of {', '.join(methods.METHOD_NAMES)} (any case)")
    p.add_argument("--negative-prompt", default=None,
                   help="the unconditional branch's text (with --method negative: its text)")
    p.add_argument("--height", type=int, default=None, help="image height in pixels (default: the model's)")
    p.add_argument("--width", type=int, default=None, help="image width in pixels (default: the model's)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's)")
    p.add_argument("--guidance-scale", type=float, default=None, help="CFG scale (default: the model's)")
    p.add_argument("--seed", type=int, default=0, help="run seed; prompt k is drawn with seed + k")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--out", type=Path, default=Path("out"))
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")
    p.add_argument("--with-baseline", action="store_true",
                   help="also draw the CFG image of each prompt (NNNNNN.cfg.png) and the mask overlays")
    p.add_argument("--masks", action="store_true", help="write SP-Guard's mask overlays (NNNNNN.mask.png)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    spg = p.add_argument_group("SP-Guard (defaults: the model folder's, else SPGuard's)")
    methods.add_spguard_arguments(spg)
    spg.add_argument("--concept", action="append",
                     help="an unsafe concept (repeatable; default: the model's): SP-Guard's concepts, SLD's "
                          "joined into one, the negative method's text; cfg has none")
    p.set_defaults(func=generate)


def _method(args, model: str):
    """The method object of --method (any case) and its flags; --concept means what the method makes of it."""
    name, concepts = args.method.lower(), args.concept
    if name == "spguard":
        from .pipeline import read_defaults

        model_defaults = None if model == "tiny" else read_defaults(model).get("spguard")
        return methods.SPGuard.with_defaults(model_defaults, **methods.spguard_knobs(args), concepts=concepts)
    if name.startswith("sld-") and concepts:
        return methods.SLD(name[4:], concept=", ".join(concepts))
    if name == "negative":
        if concepts and args.negative_prompt is not None:
            raise UsageError("--concept and --negative-prompt both give the negative method's text; give one")
        text = ", ".join(concepts) if concepts else args.negative_prompt
        return methods.NegativePrompt(text)
    if name == "cfg" and concepts:
        raise UsageError("--concept has no meaning with --method cfg, which guides away from nothing; "
                         "use --negative-prompt, or a method that takes concepts")
    return methods.resolve_method(name)


def resolve_model(model: str | None) -> str:
    """--model as loaded: a folder, 'tiny', or (None) the embedded model if installed, else 'tiny'."""
    if model is None:
        return str(PACKAGED_MODEL) if (PACKAGED_MODEL / "model_index.json").is_file() else "tiny"
    return model if model == "tiny" else str(Path(model).resolve())


def load_pipeline(model: str | None, device: str | None = None):
    """The pipeline for --model (see resolve_model) on a device (default: cuda when available)."""
    import torch

    from .pipeline import SafeDiffusionPipeline
    from .testing import tiny_components

    model = resolve_model(model)
    if model == "tiny":
        pipe = SafeDiffusionPipeline.from_components(**tiny_components())
    else:
        pipe = SafeDiffusionPipeline.from_pretrained(model)
    return pipe.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def generate(args) -> int:
    from . import jobs

    records = jobs.read_prompts(args.prompt, args.prompts)
    model = resolve_model(args.model)
    method = _method(args, model)
    negative_prompt = None if args.method.lower() == "negative" else args.negative_prompt  # the method's text
    settings = jobs.JobSettings(model=model, method=method, steps=args.steps,
                                guidance_scale=args.guidance_scale, seed=args.seed, batch_size=args.batch_size,
                                with_baseline=args.with_baseline, masks=args.masks or args.with_baseline,
                                height=args.height, width=args.width, negative_prompt=negative_prompt)
    try:
        summary = jobs.run_job(records, settings, args.out, lambda device: load_pipeline(model, device),
                               device=args.device, progress=not args.no_progress)
    except KeyboardInterrupt:
        print("spguard: interrupted; finished prompts are kept, rerun the same command to go on", file=sys.stderr)
        return SIGINT_STATUS
    if summary is not None:  # rank 0 speaks for the job
        print(f"wrote {summary.total} images and {jobs.REPORTS} to {args.out} ({summary.guided} guided)")
        if summary.failed:
            print(f"spguard: warning: {summary.failed} prompts failed; their errors are in {jobs.REPORTS}",
                  file=sys.stderr)
    return 0


def _report_parser(sub):
    p = sub.add_parser("report", help="write DIR/report.html: images, CFG images, masks, harmfulness")
    p.add_argument("dir", type=Path, help="an output folder of `spguard generate`")
    p.set_defaults(func=report)


def report(args) -> int:
    from .report_html import write_report

    path = write_report(args.dir)
    print(f"wrote {path}")
    return 0


def _eval_parser(sub):
    p = sub.add_parser("eval", help="unsafe rate (NudeNet), PSNR/SSIM against baselines, ROC AUC of harmfulness")
    p.add_argument("dir", type=Path, help="an output folder of `spguard generate`")
    p.add_argument("--baseline", type=Path, default=None,
                   help="an output folder whose NNNNNN.png are the baselines (default: DIR's NNNNNN.cfg.png)")
    p.add_argument("--nudenet-threshold", type=float, default=None,
                   help="detection score from which an exposed body part makes an image unsafe")
    p.set_defaults(func=evaluate)


def evaluate(args) -> int:
    from . import evaluate as ev

    kwargs = {} if args.nudenet_threshold is None else {"nudenet_threshold": args.nudenet_threshold}
    results = ev.evaluate(args.dir, baseline=args.baseline, **kwargs)
    print(ev.format_table(results))
    print(f"wrote {args.dir / ev.EVAL_FILE}")
    return 0


def _bench_parser(sub):
    # Listed for --help only: main() hands `bench ...` to the benchmarks' own parsers.
    sub.add_parser("bench", help="benchmarks: fused ops and end to end; `spguard bench safety`: the safety benchmark")


def bench(argv: list[str]) -> int:
    if argv[:1] == ["safety"]:
        from .world import safety_bench

        return safety_bench.main(argv[1:])
    from . import bench as kernel_bench

    return kernel_bench.main(argv)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="spguard", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _generate_parser(sub)
    _report_parser(sub)
    _eval_parser(sub)
    _bench_parser(sub)
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:
        return bench(argv[1:])
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except WriteError as exc:
        print(f"spguard: error: {exc}; finished prompts are kept, rerun the same command once fixed",
              file=sys.stderr)
        return WRITE_FAILED_STATUS
    except (UsageError, ValueError, FileNotFoundError, ModelLoadError) as exc:
        print(f"spguard: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
