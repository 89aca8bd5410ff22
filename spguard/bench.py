"""`spguard bench`: the fused kernels, then SP-Guard vs CFG end to end.

Kernels: each fused op on each available backend vs the eager torch reference, at SD-1.5's shapes
(docs/design.md, "The fused operations"): latents (B, 4, 64, 64), cross-attention q (B, 8, 4096, 40),
k (B, 8, 77, 40), B = 1 and 8; a table of time, ratio (eager time / backend time, measured in the same run) and achieved GB/s for the
bytes the op must move (inputs read once, outputs written once), also as a share of the device's copy
bandwidth (one tensor copied into another, larger than any cache, in the same run). Ops whose inputs fit
in the cache can exceed 100%.

End to end: whole generations, SP-Guard, CFG and SLD in this engine and diffusers'
StableDiffusionPipeline / StableDiffusionPipelineSafe on the same weights, for a benign and a harmful
prompt set: T = 50 on the tiny UNet, then T = 10, t_p = 2 at 256 px on the SD-1.5-sized random UNet. Each
pipeline's UNet evaluations per image are counted in the loop (a forward hook on the UNet): the cost model,
exact on any machine. Times are the process's CPU time by default (the machine may be shared), repeats
interleaved over the pipelines, medians with their spread; the medians give the final line
`benign_ratio=... harmful_ratio=... guidance_share=... engine_vs_diffusers=...`, the last being engine CFG
over diffusers' StableDiffusionPipeline (both prompt sets).
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch

from spguard import ops
from spguard.methods import CFG, SPGuard
from spguard.ops import cases, reference

GUIDANCE = 7.5
QUANTILE = 0.9
BATCHES = (1, 8)
COPY_BYTES = 256 * 2**20  # larger than any CPU's last-level cache, so the copy measures memory bandwidth


@dataclass
class OpCase:
    """One op on one input set: the eager reference, the dispatched op, and the bytes it must move."""

    name: str
    batch: int
    eager: Callable[[], object]
    fused: Callable[[], object]
    bytes_moved: int


def _nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def op_cases(batch: int, device="cpu", dtype=torch.float32) -> list[OpCase]:
    """The benchmarked calls at SD-1.5 sizes; shared by benchmarks/ (pytest-benchmark) and `spguard bench`."""
    C, H, W = cases.SD15_LATENT
    e_u, e_p, e_s = cases.latent_triplet(batch, C, H, W, dtype=dtype, device=device)
    e_s1 = e_s[:, None].contiguous()
    strength = cases.strength(batch, device=device)
    attention = cases.attention_map(batch, H * W, device=device)
    q, k, mask = cases.attention_inputs(batch, **cases.SD15_ATTENTION, dtype=dtype, device=device)
    latent, weight = _nbytes(e_u), e_u.numel() * 4
    return [
        OpCase("phase1_step", batch, lambda: reference.phase1_step(e_u, e_p, e_s1, GUIDANCE),
               lambda: ops.phase1_step(e_u, e_p, e_s1, GUIDANCE), 4 * latent),
        OpCase("phase2_step/noise", batch,
               lambda: reference.phase2_step(e_u, e_p, e_s, strength, GUIDANCE, QUANTILE),
               lambda: ops.phase2_step(e_u, e_p, e_s, strength, GUIDANCE, QUANTILE), 4 * latent + weight),
        OpCase("phase2_step/attention", batch,
               lambda: reference.phase2_step(e_u, e_p, e_s, strength, GUIDANCE, QUANTILE, attention),
               lambda: ops.phase2_step(e_u, e_p, e_s, strength, GUIDANCE, QUANTILE, attention),
               4 * latent + weight + _nbytes(attention)),
        OpCase("cross_attention_aggregate", batch, lambda: reference.cross_attention_aggregate(q, k, mask),
               lambda: ops.cross_attention_aggregate(q, k, mask), _nbytes(q, k) + batch * q.shape[2] * 4),
    ]


def time_call(fn: Callable[[], object], device="cpu", min_seconds: float = 0.2, repeats: int = 5,
              clock: Callable[[], float] = time.perf_counter) -> float:
    """Best over `repeats` of the mean time of a call, in seconds (CUDA events on a GPU).

    The best, not the median: on a shared CPU other processes only ever add time. `clock` may be
    time.thread_time for single-threaded runs: CPU time is not inflated while the thread waits for a core.
    """
    fn()  # warm-up: first-call allocation, kernel compilation
    if torch.device(device).type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, return_mode="median") / 1e3
    start = clock()
    calls = 0
    while clock() - start < min_seconds / repeats or calls == 0:
        fn()
        calls += 1
    samples = []
    for _ in range(repeats):
        t0 = clock()
        for _ in range(calls):
            fn()
        samples.append((clock() - t0) / calls)
    return min(samples)


# glibc mallopt parameters (malloc.h): M_TRIM_THRESHOLD = -1, M_MMAP_THRESHOLD = -3. 32 MiB is the
# largest mmap threshold glibc accepts on 64-bit systems (DEFAULT_MMAP_THRESHOLD_MAX).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_HEAP_BLOCK_LIMIT = 32 * 2**20
_HEAP_TRIM_LIMIT = 2**30


def keep_freed_memory_in_heap() -> None:
    """Make glibc's malloc reuse freed blocks of up to 32 MiB instead of unmapping them.

    Otherwise the eager reference's intermediates (10 MB of scores for cross-attention at B = 1) are,
    depending on the process's allocation history, either reused or mapped and page-faulted afresh on
    every call: that reference took 7-9 ms in some processes and 15.5-16.5 ms in others on the same
    machine. Keeping them in the heap gives eager its faster time, so ratios are reproducible and
    conservative. Does nothing off Linux, or where the C library has no mallopt (not glibc).
    """
    if not sys.platform.startswith("linux"):
        return
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is not None:
        mallopt(_M_MMAP_THRESHOLD, _HEAP_BLOCK_LIMIT)
        mallopt(_M_TRIM_THRESHOLD, _HEAP_TRIM_LIMIT)


def copy_bandwidth(device="cpu", min_seconds: float = 0.2, clock: Callable[[], float] = time.perf_counter) -> float:
    """GB/s of copying one COPY_BYTES tensor into another (bytes read plus bytes written)."""
    src = torch.empty(COPY_BYTES // 4, device=device)
    dst = torch.empty_like(src)
    return 2 * COPY_BYTES / time_call(lambda: dst.copy_(src), device, min_seconds, clock=clock) / 1e9


def kernel_table(device="cpu", dtype=torch.float32, batches=BATCHES, min_seconds=0.2,
                 clock: Callable[[], float] = time.perf_counter) -> list[dict]:
    kinds = {"cpu": ("cpp",), "cuda": ("cuda", "triton")}[torch.device(device).type]
    usable = [b.name for b in ops.backends() if b.available and b.name in kinds]
    rows = []
    for batch in batches:
        for case in op_cases(batch, device, dtype):
            eager = time_call(case.eager, device, min_seconds, clock=clock)
            rows.append(dict(op=case.name, backend="torch (eager)", batch=batch, seconds=eager, ratio=1.0,
                             gbps=case.bytes_moved / eager / 1e9))
            for name in usable:
                with ops.use_backend(name):
                    t = time_call(case.fused, device, min_seconds, clock=clock)
                rows.append(dict(op=case.name, backend=name, batch=batch, seconds=t, ratio=eager / t,
                                 gbps=case.bytes_moved / t / 1e9))
    return rows


def format_table(rows: list[dict], copy_gbps: float) -> str:
    lines = [f"copy bandwidth: {copy_gbps:.1f} GB/s ({COPY_BYTES >> 20} MiB tensor copied, read + write)",
             f"{'op':27s} {'backend':14s} {'B':>2s} {'time':>10s} {'x eager':>8s} {'GB/s':>7s} {'of copy':>7s}"]
    for r in rows:
        lines.append(f"{r['op']:27s} {r['backend']:14s} {r['batch']:2d} {r['seconds'] * 1e6:8.1f}us "
                     f"{r['ratio']:7.2f}x {r['gbps']:7.2f} {r['gbps'] / copy_gbps:7.0%}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# End to end

BENIGN_PROMPTS = ("a photo of a cat in a garden", "a painting of a house on a mountain")
HARMFUL_PROMPTS = ("a photo of a man with a gun and blood", "a violent fight with a knife")
# Random weights give random harmfulness scores, so each set is made to take its intended path:
# benign prompts get a threshold that P (a mean cosine, at most 1) never exceeds, so they skip phase 2
# like a prompt the model finds harmless; each harmful prompt is its own (single) concept, so
# cos(d_p, d_s) = 1, P = 1, and phase 2 guides it at full strength.
NEVER_HARMFUL = 1.0


class _UNetClock:
    """Adds the wall time of every forward of `unet` to `seconds` and the samples it evaluates (the rows of
    its batch) to `evaluations`: the cost model of a guidance method, exact on any machine. As a step
    callback, adds the time from the step's UNet forward to the end of the step (guidance math and the
    scheduler's step) to `guidance`."""

    def __init__(self, unet):
        self.seconds = self.guidance = 0.0
        self.evaluations = 0
        unet.register_forward_pre_hook(self._start, with_kwargs=True)
        unet.register_forward_hook(lambda *_: self._forward_done())

    def _start(self, module, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        self.evaluations += sample.shape[0]
        self._t0 = time.perf_counter()

    def _forward_done(self):
        self._end = time.perf_counter()
        self.seconds += self._end - self._t0

    def __call__(self, pipe, i, t, tensors):
        self.guidance += time.perf_counter() - self._end
        return {}


def _generate_timed(call, prompts, clock: Callable[[], float]) -> float:
    """Summed `clock` time of one generation per prompt (batch 1, fixed seed)."""
    start = clock()
    for prompt in prompts:
        call(prompt)
    return clock() - start


def end_to_end(components: dict, steps: int, t_p: int, size: int, repeats: int, label: str,
               prompts_per_set: int = len(BENIGN_PROMPTS), clock: str = "cpu") -> dict:
    """Time (median of `repeats`, by `clock`) and UNet evaluations per image of each pipeline on each prompt
    set; prints a table and returns the ratios of the medians."""
    from diffusers import StableDiffusionPipeline
    from diffusers.pipelines.deprecated.stable_diffusion_safe import StableDiffusionPipelineSafe

    from spguard.methods import SLD
    from spguard.pipeline import SafeDiffusionPipeline

    engine = SafeDiffusionPipeline.from_components(**components)
    engine.set_progress_bar_config(disable=True)
    extra = dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    plain = StableDiffusionPipeline(**components, **extra)
    safe = StableDiffusionPipelineSafe(**components, **extra)
    for pipe in (plain, safe):
        pipe.set_progress_bar_config(disable=True)
    common = dict(num_inference_steps=steps, height=size, width=size, output_type="np")
    unet_clock = _UNetClock(components["unet"])

    def spguard_method(prompt, harmful):
        if harmful:
            return SPGuard(t_p=t_p, concepts=(prompt,))
        return SPGuard(t_p=t_p, harmfulness_threshold=NEVER_HARMFUL)

    runs = {
        "engine cfg": lambda p, h: engine(p, method=CFG(), seed=0, **common),
        "engine spguard": lambda p, h: engine(p, method=spguard_method(p, h), seed=0,
                                              callback_on_step_end=unet_clock, **common),
        "engine sld": lambda p, h: engine(p, method=SLD(), seed=0, **common),  # diffusers' default SLD preset
        "diffusers sd": lambda p, h: plain(p, generator=torch.Generator().manual_seed(0), **common),
        "diffusers safe (sld)": lambda p, h: safe(p, generator=torch.Generator().manual_seed(0), **common),
    }
    benign, harmful_set = BENIGN_PROMPTS[:prompts_per_set], HARMFUL_PROMPTS[:prompts_per_set]
    timer = time.process_time if clock == "cpu" else time.perf_counter
    runs["engine cfg"](BENIGN_PROMPTS[0], False)  # warm-up of the shared weights, allocator, text caches
    # The repeats interleaved over the pipelines, so a machine that slows down or speeds up during the
    # benchmark shifts every pipeline's time alike instead of the ratios, and the order rotated by one
    # pipeline per repeat, so no pipeline always runs first (after another's allocations) or last; medians,
    # with the spread printed.
    times, evaluations = {}, {}
    unet_seconds = guidance_seconds = 0.0
    order = list(runs)
    for r in range(repeats):
        first = r % len(order)
        for name in order[first:] + order[:first]:
            run = runs[name]
            for harmful, prompts in ((False, benign), (True, harmful_set)):
                timed = name == "engine spguard" and harmful  # the guidance share is measured on these calls
                unet_clock.seconds, unet_clock.evaluations, unet_clock.guidance = 0.0, 0, 0.0
                seconds = _generate_timed(lambda p, h=harmful: run(p, h), prompts, timer)
                times.setdefault((name, harmful), []).append(seconds)
                evaluations[name, harmful] = unet_clock.evaluations / len(prompts)
                if timed:
                    unet_seconds += unet_clock.seconds
                    guidance_seconds += unet_clock.guidance
    median = {key: statistics.median(values) for key, values in times.items()}
    cfg_benign, cfg_harmful = median["engine cfg", False], median["engine cfg", True]
    clock_name = "process CPU time (all threads)" if clock == "cpu" else "wall time"
    print(f"\n{label}: T={steps}, t_p={t_p}, {size}x{size} px, {len(benign)} benign and {len(harmful_set)} harmful "
          f"prompts, batch 1, threads={torch.get_num_threads()}; median [min-max] of {repeats} of {clock_name}; "
          "ratios are vs engine cfg; evals: UNet samples evaluated per image", flush=True)
    print("  benign prompts: harmfulness threshold 1.0, never exceeded -> phase 2 skipped (cost of CFG)")
    print("  harmful prompts: each prompt is its own concept -> P = 1 -> phase 2 guides every step")
    print(f"  {'pipeline':22s} {'evals':>5s} {'benign':>8s} {'spread':>15s} {'ratio':>6s}   "
          f"{'evals':>5s} {'harmful':>8s} {'spread':>15s} {'ratio':>6s}")
    for name in runs:
        cells = []
        for harmful, cfg in ((False, cfg_benign), (True, cfg_harmful)):
            values = times[name, harmful]
            cells.append(f"{evaluations[name, harmful]:5.0f} {median[name, harmful]:7.2f}s "
                         f"[{min(values):6.2f}-{max(values):6.2f}] {median[name, harmful] / cfg:6.3f}")
        print(f"  {name:22s} {cells[0]}   {cells[1]}", flush=True)
    diffusers = median["diffusers sd", False] + median["diffusers sd", True]
    return dict(benign_ratio=median["engine spguard", False] / cfg_benign,
                harmful_ratio=median["engine spguard", True] / cfg_harmful,
                guidance_share=guidance_seconds / unet_seconds,
                engine_vs_diffusers=(cfg_benign + cfg_harmful) / diffusers)


def sdxl_end_to_end(steps: int, t_p: int, size: int, repeats: int, device="cpu") -> dict:
    """Wall time of SDXL generations (random UNet of SDXL base's configuration): the engine's CFG, SP-Guard
    on a benign and a harmful prompt (as in end_to_end), and diffusers' StableDiffusionXLPipeline."""
    from diffusers import StableDiffusionXLPipeline

    from spguard.pipeline import SafeDiffusionPipeline
    from spguard.testing import sdxl_components

    reference = StableDiffusionXLPipeline(**sdxl_components()).to(device)
    engine = SafeDiffusionPipeline.from_pipe(reference)
    for pipe in (reference, engine):
        pipe.set_progress_bar_config(disable=True)
    common = dict(num_inference_steps=steps, height=size, width=size, guidance_scale=GUIDANCE, output_type="np")
    benign, harmful = BENIGN_PROMPTS[0], HARMFUL_PROMPTS[0]
    runs = {
        "engine cfg": lambda: engine(benign, method=CFG(), seed=0, **common),
        "engine spguard benign": lambda: engine(benign, method=SPGuard(t_p=t_p, harmfulness_threshold=NEVER_HARMFUL),
                                                seed=0, **common),
        "engine spguard harmful": lambda: engine(harmful, method=SPGuard(t_p=t_p, concepts=(harmful,)), seed=0,
                                                 **common),
        "diffusers sdxl": lambda: reference(benign, generator=torch.Generator().manual_seed(0), **common),
    }
    times = {}
    for _ in range(repeats):  # interleaved, best kept, as in end_to_end
        for name, run in runs.items():
            start = time.perf_counter()
            run()  # images come back as numpy arrays: the device has finished
            times[name] = min(times.get(name, float("inf")), time.perf_counter() - start)
    print(f"\nSDXL-sized random UNet: T={steps}, t_p={t_p}, {size}x{size} px, batch 1, best of {repeats}; "
          "ratios are vs engine cfg", flush=True)
    for name, seconds in times.items():
        print(f"  {name:24s} {seconds:8.2f}s {seconds / times['engine cfg']:6.3f}", flush=True)
    return dict(sdxl_benign_ratio=times["engine spguard benign"] / times["engine cfg"],
                sdxl_harmful_ratio=times["engine spguard harmful"] / times["engine cfg"],
                sdxl_diffusers_ratio=times["diffusers sdxl"] / times["engine cfg"])


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="spguard bench", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--batches", type=int, nargs="+", default=list(BATCHES))
    parser.add_argument("--min-seconds", type=float, default=0.2, help="CPU timing budget per measurement")
    parser.add_argument("--part", choices=["all", "kernels", "e2e"], default="all")
    parser.add_argument("--threads", type=int, default=None, help="torch/OpenMP threads (default: torch's)")
    parser.add_argument("--cpu-time", action="store_true",
                        help="time kernels by the calling thread's CPU time (robust on a shared machine; one thread)")
    parser.add_argument("--tiny-steps", type=int, default=50)
    parser.add_argument("--sd-steps", type=int, default=10)
    parser.add_argument("--sd-size", type=int, default=256, help="pixels per side for the SD-1.5-sized UNet")
    parser.add_argument("--no-sd15", action="store_true", help="skip the SD-1.5-sized UNet (minutes on a CPU)")
    parser.add_argument("--sd-repeats", type=int, default=3,
                        help="runs of each SD-1.5-sized generation, the median kept (each adds minutes on a CPU)")
    parser.add_argument("--e2e-clock", choices=["cpu", "wall"], default="cpu",
                        help="end-to-end times by the process's CPU time (default: fair on a shared machine) or wall")
    parser.add_argument("--sdxl", action="store_true", default=None,
                        help="also the SDXL-sized random UNet (default: on a GPU only; one forward takes minutes on a CPU)")
    parser.add_argument("--sdxl-steps", type=int, default=5)
    parser.add_argument("--sdxl-size", type=int, default=512, help="pixels per side for the SDXL-sized UNet")
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)
    keep_freed_memory_in_heap()
    if args.cpu_time:
        args.threads = 1  # thread_time sees only the calling thread
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.part in ("all", "kernels"):
        print(f"spguard bench: fused guidance kernels, device={args.device} dtype={args.dtype} "
              f"threads={torch.get_num_threads()} clock={'thread CPU time' if args.cpu_time else 'wall'}")
        for b in ops.backends():
            print(f"  backend {b}")
        clock = time.thread_time if args.cpu_time else time.perf_counter
        rows = kernel_table(args.device, getattr(torch, args.dtype), tuple(args.batches), args.min_seconds, clock)
        print(format_table(rows, copy_bandwidth(args.device, args.min_seconds, clock)))
    if args.part in ("all", "e2e"):
        from spguard.testing import sd15_components, tiny_components

        # t_p scales with T so that phase 1 keeps the paper's share of the steps (10 of 50). The tiny UNet's
        # ops are too small to split across threads: on a busy machine OpenMP barriers would dominate.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        end_to_end(tiny_components(), args.tiny_steps, args.tiny_steps // 5, 32, repeats=3, label="tiny UNet",
                   clock=args.e2e_clock)
        torch.set_num_threads(threads)
        if args.sdxl or (args.sdxl is None and torch.device(args.device).type == "cuda"):
            result = sdxl_end_to_end(args.sdxl_steps, max(args.sdxl_steps // 5, 1), args.sdxl_size, repeats=1,
                                     device=args.device)
            print(" ".join(f"{k}={v:.4g}" for k, v in result.items()))
        if not args.no_sd15:  # last: its line is the bench's final line
            # One prompt per set: a step of this UNet takes seconds on a CPU.
            result = end_to_end(sd15_components(), args.sd_steps, args.sd_steps // 5, args.sd_size,
                                repeats=args.sd_repeats, label="SD-1.5-sized random UNet", prompts_per_set=1,
                                clock=args.e2e_clock)
            print(" ".join(f"{k}={v:.4g}" for k, v in result.items()))
    return 0
