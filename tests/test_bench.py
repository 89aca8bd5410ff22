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


def test_end_to_end_counts_the_unet_evaluations_of_each_pipeline():
    steps, t_p = 5, 1  # the bench's t_p is T // 5
    out = subprocess.run([sys.executable, "-m", "spguard.cli", "bench", "--part", "e2e", "--no-sd15",
                          "--tiny-steps", str(steps)], check=True, capture_output=True, text=True, timeout=600).stdout
    # Per image: CFG evaluates (unconditional, prompt) each step; SP-Guard adds the concept row in phase 1 and,
    # for a harmful prompt, in phase 2 too; SLD always evaluates three rows.
    expected = {"engine cfg": (2 * steps, 2 * steps), "engine spguard": (2 * steps + t_p, 3 * steps),
                "engine sld": (3 * steps, 3 * steps), "diffusers sd": (2 * steps, 2 * steps),
                "diffusers safe (sld)": (3 * steps, 3 * steps)}
    number = r"\s+([0-9.]+)s \[\s*([0-9.]+)-\s*([0-9.]+)\]\s+([0-9.]+)"
    for name, (benign, harmful) in expected.items():
        row = re.search(rf"^  {re.escape(name)}\s+(\d+){number}\s+(\d+){number}$", out, re.MULTILINE)
        assert row, f"no {name} row in\n{out}"
        assert (int(row.group(1)), int(row.group(6))) == (benign, harmful), row.group(0)
        for first in (2, 7):  # median within its spread
            median, low, high = (float(row.group(first + i)) for i in range(3))
            assert low <= median <= high
