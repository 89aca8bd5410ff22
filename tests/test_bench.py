"""`spguard bench`'s kernel table: every op on every available CPU backend, beside the copy bandwidth."""

import re
import subprocess
import sys

import pytest

from spguard import ops
from spguard.bench import op_cases


def test_kernel_table_lists_every_op_and_backend():
    # A process of its own: the bench sets process-wide state (threads, grad mode, the allocator).
    out = subprocess.run([sys.executable, "-m", "spguard.cli", "bench", "--part", "kernels", "--batches", "1",
                          "--min-seconds", "0.01", "--threads", "1"], check=True, capture_output=True, text=True,
                         timeout=300).stdout
    copy = re.search(r"copy bandwidth: ([0-9.]+) GB/s", out)
    assert copy and float(copy.group(1)) > 0
    backends = ["torch (eager)"] + [b.name for b in ops.backends() if b.available and b.name == "cpp"]
    for case in op_cases(1):
        for backend in backends:
            row = re.search(rf"^{re.escape(case.name)}\s+{re.escape(backend)}\s+1\s+([0-9.]+)us\s+([0-9.]+)x\s+"
                            rf"([0-9.]+)\s+(\d+)%$", out, re.MULTILINE)
            assert row, f"no {case.name} / {backend} row in\n{out}"
            assert float(row.group(1)) > 0 and float(row.group(2)) > 0
            if backend == "torch (eager)":
                assert float(row.group(2)) == pytest.approx(1.0)
