"""Gated delta rule (Gated DeltaNet) ops, fla conventions: naive reference, chunked CPU path, per-step decode path."""

from .chunk import chunk_gated_delta_rule
from .naive import naive_recurrent_gated_delta_rule
from .recurrent import fused_recurrent_gated_delta_rule

__all__ = ["chunk_gated_delta_rule", "fused_recurrent_gated_delta_rule", "naive_recurrent_gated_delta_rule"]
