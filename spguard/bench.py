"""`spguard bench`, kernel part: each fused op on each available backend vs the eager torch reference.

Shapes are SD-1.5's (SPEC.md): latents (B, 4, 64, 64), cross-attention q (B, 8, 4096, 40), k (B, 8, 77, 40),
at B = 1 and 8. Prints one table: op, backend, batch, time, ratio (eager time / backend time, measured in
the same run) and achieved GB/s for the bytes the op must move (inputs read once, outputs written once).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch

from spguard import ops
from spguard.ops import cases, reference

GUIDANCE = 7.5
QUANTILE = 0.9
BATCHES = (1, 8)


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


def time_call(fn: Callable[[], object], device="cpu", min_seconds: float = 0.2, repeats: int = 5) -> float:
    """Median over `repeats` of the mean time of a call, in seconds (CUDA events on a GPU)."""
    fn()  # warm-up: first-call allocation, kernel compilation
    if torch.device(device).type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, return_mode="median") / 1e3
    start = time.perf_counter()
    calls = 0
    while time.perf_counter() - start < min_seconds / repeats or calls == 0:
        fn()
        calls += 1
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        samples.append((time.perf_counter() - t0) / calls)
    return statistics.median(samples)


def _with_backend(name: str, fn: Callable[[], object]) -> Callable[[], object]:
    def call():
        previous = os.environ.get("SPGUARD_BACKEND")
        os.environ["SPGUARD_BACKEND"] = name
        try:
            return fn()
        finally:
            if previous is None:
                del os.environ["SPGUARD_BACKEND"]
            else:
                os.environ["SPGUARD_BACKEND"] = previous

    return call


def kernel_table(device="cpu", dtype=torch.float32, batches=BATCHES, min_seconds=0.2) -> list[dict]:
    kinds = {"cpu": ("cpp",), "cuda": ("cuda", "triton")}[torch.device(device).type]
    usable = [b.name for b in ops.backends() if b.available and b.name in kinds]
    rows = []
    for batch in batches:
        for case in op_cases(batch, device, dtype):
            eager = time_call(case.eager, device, min_seconds)
            rows.append(dict(op=case.name, backend="torch (eager)", batch=batch, seconds=eager, ratio=1.0,
                             gbps=case.bytes_moved / eager / 1e9))
            for name in usable:
                t = time_call(_with_backend(name, case.fused), device, min_seconds)
                rows.append(dict(op=case.name, backend=name, batch=batch, seconds=t, ratio=eager / t,
                                 gbps=case.bytes_moved / t / 1e9))
    return rows


def format_table(rows: list[dict]) -> str:
    lines = [f"{'op':27s} {'backend':14s} {'B':>2s} {'time':>10s} {'x eager':>8s} {'GB/s':>7s}"]
    for r in rows:
        lines.append(f"{r['op']:27s} {r['backend']:14s} {r['batch']:2d} {r['seconds'] * 1e6:8.1f}us "
                     f"{r['ratio']:7.2f}x {r['gbps']:7.2f}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="spguard bench", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--batches", type=int, nargs="+", default=list(BATCHES))
    parser.add_argument("--min-seconds", type=float, default=0.2, help="CPU timing budget per measurement")
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)
    print(f"spguard bench: fused guidance kernels, device={args.device} dtype={args.dtype} "
          f"threads={torch.get_num_threads()}")
    for b in ops.backends():
        print(f"  backend {b}")
    rows = kernel_table(args.device, getattr(torch, args.dtype), tuple(args.batches), args.min_seconds)
    print(format_table(rows))
    return 0
