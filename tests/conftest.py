import os

# Triton kernels run on a CPU-only machine only under the interpreter, which must be chosen before
# any @triton.jit decorator runs (docs/design.md, "Measured on the development machines").
try:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:
    pass

import contextlib  # noqa: E402 - after the interpreter choice above

import pytest  # noqa: E402


@pytest.fixture
def select_backend():
    """select_backend(name) -> device: the fused ops run on backend `name` (spguard.use_backend) for the rest
    of the test, and the test's inputs belong on the returned device (spguard.ops.checks.backend_device)."""
    from spguard import use_backend
    from spguard.ops.checks import backend_device

    with contextlib.ExitStack() as stack:
        def select(name):
            stack.enter_context(use_backend(name))
            return backend_device(name)

        yield select
