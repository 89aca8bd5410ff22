import os

# Triton kernels run on a CPU-only machine only under the interpreter, which must be chosen before
# any @triton.jit decorator runs (docs/design.md, "Measured on the development machines").
try:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:
    pass
