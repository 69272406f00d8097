"""Gated Linear Attention ops (fla conventions): naive reference, chunked PyTorch, fused recurrent (decode)."""

from .chunk import chunk_gla
from .naive import naive_recurrent_gla
from .recurrent import fused_recurrent_gla

__all__ = ["chunk_gla", "fused_recurrent_gla", "naive_recurrent_gla"]
