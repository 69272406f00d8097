"""Causal sliding-window softmax attention with optional learnable sink logits (Lizard's meta-memory)."""

from .cached import sliding_window_attention_over_cache
from .chunk import chunk_sliding_window_attention
from .naive import naive_sliding_window_attention

__all__ = ["chunk_sliding_window_attention", "naive_sliding_window_attention", "sliding_window_attention_over_cache"]
