"""Triton implementations of the fused guidance ops, one op per module, registered with torch.library.

Importing this package needs triton; spguard.ops imports it only when triton is installed.
"""

from .cross_attention_aggregate import MAX_HEAD_DIM as CROSS_ATTENTION_MAX_HEAD_DIM
from .cross_attention_aggregate import cross_attention_aggregate
from .phase1_step import phase1_step
from .phase2_step import phase2_step

__all__ = ["CROSS_ATTENTION_MAX_HEAD_DIM", "cross_attention_aggregate", "phase1_step", "phase2_step"]
