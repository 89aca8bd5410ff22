"""pytest-benchmark: each fused op vs the eager reference on SD-1.5-sized tensors (B = 1 and 8).

Run: pytest benchmarks/ --benchmark-columns=median,ops (the summary table is also `spguard bench`).
Each test prints the time ratio against the eager reference measured in the same run, and the GB/s
achieved for the bytes the op must move.
"""

from __future__ import annotations

import pytest
import torch

from spguard import ops, use_backend
from spguard.bench import BATCHES, keep_freed_memory_in_heap, op_cases, time_call

keep_freed_memory_in_heap()  # reproducible eager times (see its docstring)

KERNEL_BACKENDS = [b.name for b in ops.backends() if b.available and b.name == "cpp"]
CASES = [(batch, i) for batch in BATCHES for i in range(len(op_cases(1)))]
_eager_seconds: dict[tuple[int, int], float] = {}


def _case(batch, index):
    return op_cases(batch)[index]


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


@pytest.mark.parametrize("batch,index", CASES, ids=lambda v: str(v))
def test_eager(benchmark, batch, index):
    case = _case(batch, index)
    benchmark.group = f"{case.name} B={batch}"
    benchmark(case.eager)
    if benchmark.stats:  # None under --benchmark-disable, which runs each call once as a smoke test
        _eager_seconds[(batch, index)] = benchmark.stats.stats.median


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("batch,index", CASES, ids=lambda v: str(v))
def test_fused(benchmark, backend, batch, index):
    case = _case(batch, index)
    benchmark.group = f"{case.name} B={batch}"
    with use_backend(backend):
        benchmark(case.fused)
    if not benchmark.stats:
        return
    seconds = benchmark.stats.stats.median
    eager = _eager_seconds.get((batch, index)) or time_call(case.eager)
    benchmark.extra_info.update(ratio=eager / seconds, gbps=case.bytes_moved / seconds / 1e9)
    print(f"\n{case.name} B={batch} {backend}: {seconds * 1e6:.1f} us, {eager / seconds:.2f}x eager, "
          f"{case.bytes_moved / seconds / 1e9:.2f} GB/s (threads={torch.get_num_threads()}, "
          f"backend={backend})")
