"""Triton implementations of the fused guidance ops, one op per module, registered with torch.library.

Importing this package needs triton; spguard.ops imports it only when triton is installed.

It installs as `spguard.kernels`, and registers the ops only under that name. In a checkout, this folder is also
importable as the top-level `kernels` whenever the checkout's root is on sys.path (pytest, `python -m` from the
root). That is the import name of Hugging Face's kernels package, which transformers (5.25 on) depends on and
imports. So imported as `kernels`, this folder hands the import over to the installed package (`_hand_over`),
and registers nothing: a second registration of the same triton_op destroys the first one's operator, and
spguard.ops, which holds it, would then call freed memory (a crash or `std::bad_alloc` in a later call).
"""


def _hand_over() -> None:
    """Make `import kernels` return the installed package of that name, found on sys.path without the checkout's
    root; with none installed, this module stays in place, empty."""
    import importlib.machinery
    import importlib.util
    import os
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    elsewhere = [p for p in sys.path if os.path.abspath(p or os.curdir) != root]
    spec = importlib.machinery.PathFinder.find_spec(__name__, elsewhere)
    if spec is None or spec.loader is None:
        return
    module = importlib.util.module_from_spec(spec)
    sys.modules[__name__] = module  # the import statement returns what sys.modules holds once this file has run
    spec.loader.exec_module(module)


if __name__ == "spguard.kernels":
    from .cross_attention_aggregate import MAX_HEAD_DIM as CROSS_ATTENTION_MAX_HEAD_DIM
    from .cross_attention_aggregate import cross_attention_aggregate
    from .phase1_step import phase1_step
    from .phase2_step import phase2_step

    __all__ = ["CROSS_ATTENTION_MAX_HEAD_DIM", "cross_attention_aggregate", "phase1_step", "phase2_step"]
else:
    _hand_over()
