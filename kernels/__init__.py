"""Triton implementations of the fused guidance ops, one op per module, registered with torch.library.

Importing this package needs triton; spguard.ops imports it only when triton is installed.

It installs as `spguard.kernels`, and registers the ops only under that name. In a checkout, this folder is also
importable as the top-level `kernels`, the import name of Hugging Face's kernels package, which transformers
probes for by importing it whenever the checkout's root is on sys.path (pytest, scripts run from the root). A
second registration of the same triton_op destroys the first one's operator, and spguard.ops, which holds it,
would then call freed memory (a crash or `std::bad_alloc` in a later call).
"""

if __name__ == "spguard.kernels":
    from .cross_attention_aggregate import MAX_HEAD_DIM as CROSS_ATTENTION_MAX_HEAD_DIM
    from .cross_attention_aggregate import cross_attention_aggregate
    from .phase1_step import phase1_step
    from .phase2_step import phase2_step

    __all__ = ["CROSS_ATTENTION_MAX_HEAD_DIM", "cross_attention_aggregate", "phase1_step", "phase2_step"]
