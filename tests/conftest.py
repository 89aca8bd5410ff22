import os

# Triton kernels run on a CPU-only machine only under the interpreter, which must be chosen before
# any @triton.jit decorator runs (ENVIRONMENT.md).
try:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:
    pass
