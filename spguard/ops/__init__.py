"""The fused guidance operations, dispatched to the chosen backend (reference: spguard.ops.reference)."""

from .reference import cross_attention_aggregate, phase1_step, phase2_step, quantile_index

__all__ = ["cross_attention_aggregate", "phase1_step", "phase2_step", "quantile_index"]
