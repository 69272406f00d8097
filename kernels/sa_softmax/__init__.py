"""Causal attention with Self-Adjust Softmax (SA-Softmax): weights ``x * softmax(x)`` or a min/max-normalised form."""

from .chunk import chunk_sa_softmax_attention
from .naive import naive_sa_softmax_attention

__all__ = ["chunk_sa_softmax_attention", "naive_sa_softmax_attention"]
