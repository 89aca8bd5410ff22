"""GPU end-to-end checks of issue 13 (run by benchmarks/gpu_check.sh; never run by the test suite).

1. Host synchronisations of whole SP-Guard generations (noise and attention masks), recorded with
   torch.cuda.set_sync_debug_mode("warn") and listed by the Python line that caused them: the denoising
   steps of phase 1 and phase 2 should cause none; expected are the end of phase 1 (the active samples'
   `nonzero`, the generation's one synchronisation) and what lies outside the loop (decoding to numpy).
2. Time of whole generations on a random SD-1.5-sized UNet, SP-Guard benign and harmful against CFG
   (median of 3, CUDA synchronised), at batch 1 and 8.
3. One SP-Guard denoising step (UNet + guidance) of phase 1 and one of phase 2 under
   torch.compile(mode="reduce-overhead"): it runs, repeats, and equals the eager step (last: it compiles
   the UNet twice, minutes).

Dry run on a CPU (Python errors only): python benchmarks/gpu_e2e.py --device cpu --tiny --steps 4
"""

from __future__ import annotations

import argparse
import collections
import statistics
import time
import traceback
import warnings

import torch

from spguard import SafeDiffusionPipeline
from spguard.bench import BENIGN_PROMPTS, HARMFUL_PROMPTS, NEVER_HARMFUL
from spguard.methods import CFG, Concepts, SPGuard
from spguard.testing import sd15_components, tiny_components


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def sync_sources(engine, method, prompt, common, device) -> collections.Counter:
    """file:line -> how many synchronising CUDA calls it made during one generation."""
    engine(prompt, method=method, seed=0, **common)  # warm-up: kernel compilation and caches may sync
    _sync(device)
    if device.type != "cuda":
        return collections.Counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            engine(prompt, method=method, seed=0, **common)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return collections.Counter(f"{w.filename}:{w.lineno}" for w in caught if "synchroniz" in str(w.message))


def compiled_steps(engine, prompt, steps, t_p, device, dtype) -> list[str]:
    """Phase-1 and phase-2 SP-Guard steps (UNet + guidance) under torch.compile(mode="reduce-overhead")."""
    unet = engine.unet
    h = w = unet.config.sample_size
    cond = engine._encode([prompt]).embeds
    uncond = engine._encode_cached(("",)).embeds
    method = SPGuard(t_p=t_p, concepts=(prompt,))
    concepts = Concepts(method.concepts, engine._encode_cached(method.concepts))
    results = []
    for phase, i in (("phase 1", 0), ("phase 2", t_p)):
        guider = method.start(1, steps, 7.5, concepts)
        if i >= t_p:  # end phase 1 eagerly (its one synchronisation), then compile a phase-2 step
            e_u = torch.randn((1, 4, h, w), device=device, dtype=dtype)
            e_p = e_u + torch.randn_like(e_u)
            for j in range(t_p):
                guider.guide(j, e_u, e_p, e_p)  # d_s = d_p: P = 1, the sample is guided in phase 2
        embeds = torch.cat([uncond, cond, guider.rows.text.embeds])
        x = torch.randn((1, 4, h, w), device=device, dtype=dtype)
        t = torch.tensor(500, device=device)

        def step(x, t, embeds):
            noise = unet(torch.cat([x, x, x]), t, encoder_hidden_states=embeds).sample
            return guider.guide(i, noise[:1], noise[1:2], noise[2:])

        try:
            torch._dynamo.reset()
            compiled = torch.compile(step, mode="reduce-overhead")
            for _ in range(3):
                got = compiled(x, t, embeds).clone()
            _sync(device)
            want = step(x, t, embeds)
            error = (got.float() - want.float()).abs().max().item()
            results.append(f"{phase}: compiled (reduce-overhead) step ran 3 times, max |compiled - eager| = {error:.3g}")
        except Exception as exc:  # noqa: BLE001 - report and go on: the device time is precious
            results.append(f"{phase}: torch.compile failed: {type(exc).__name__}: {str(exc).splitlines()[0]}")
            traceback.print_exc()
    return results


def timings(engine, steps, t_p, size, batch, device, repeats=3) -> dict:
    common = dict(num_inference_steps=steps, height=size, width=size, output_type="latent")
    benign, harmful = [BENIGN_PROMPTS[0]] * batch, [HARMFUL_PROMPTS[0]] * batch
    runs = {
        ("cfg", "benign"): lambda: engine(benign, method=CFG(), seed=list(range(batch)), **common),
        ("spguard", "benign"): lambda: engine(benign, method=SPGuard(t_p=t_p, harmfulness_threshold=NEVER_HARMFUL),
                                              seed=list(range(batch)), **common),
        ("cfg", "harmful"): lambda: engine(harmful, method=CFG(), seed=list(range(batch)), **common),
        ("spguard", "harmful"): lambda: engine(harmful, method=SPGuard(t_p=t_p, concepts=(HARMFUL_PROMPTS[0],)),
                                               seed=list(range(batch)), **common),
    }
    for run in runs.values():
        run()  # warm-up
    times = collections.defaultdict(list)
    for _ in range(repeats):
        for key, run in runs.items():
            _sync(device)
            start = time.perf_counter()
            run()
            _sync(device)
            times[key].append(time.perf_counter() - start)
    return {key: statistics.median(v) for key, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="float16", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--tiny", action="store_true", help="the tiny UNet (a dry run of this script)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--parts", nargs="+", choices=["sync", "time", "compile"], default=["sync", "time", "compile"])
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    components = tiny_components() if args.tiny else sd15_components()
    size = 32 if args.tiny else args.size
    engine = SafeDiffusionPipeline.from_components(**components).to(device, dtype)
    engine.set_progress_bar_config(disable=True)
    t_p = max(1, args.steps // 5)
    print(f"gpu_e2e: {'tiny' if args.tiny else 'SD-1.5-sized random'} UNet, {device} {args.dtype}, {size} px, "
          f"T={args.steps}, t_p={t_p}", flush=True)
    if "sync" in args.parts:
        common = dict(num_inference_steps=min(args.steps, 10), height=size, width=size, output_type="np")
        for mask in ("noise", "attention"):
            method = SPGuard(t_p=2, mask=mask, concepts=(HARMFUL_PROMPTS[0],))
            sources = sync_sources(engine, method, HARMFUL_PROMPTS[0], common, device)
            print(f"sync, SP-Guard harmful, {mask} mask, T={common['num_inference_steps']}: "
                  f"{sum(sources.values())} synchronising calls", flush=True)
            for where, count in sources.most_common():
                print(f"  {count:4d}  {where}")
    if "time" in args.parts:
        for batch in args.batches:
            med = timings(engine, args.steps, t_p, size, batch, device)
            print(f"time, batch {batch}, median of 3: " + ", ".join(f"{m} {s} {t:.3f}s" for (m, s), t in med.items())
                  + f"; benign_ratio={med['spguard', 'benign'] / med['cfg', 'benign']:.3f} "
                  f"harmful_ratio={med['spguard', 'harmful'] / med['cfg', 'harmful']:.3f}", flush=True)
    if "compile" in args.parts:
        for line in compiled_steps(engine, HARMFUL_PROMPTS[0], args.steps, t_p, device, dtype):
            print(f"compile: {line}", flush=True)


if __name__ == "__main__":
    main()
