"""Causal kernel-ridge-regression attention (Cubit): ``O_i = κ(q_i, K) (κ(K, K) + λ I)⁻¹ V`` over keys ``j <= i``."""

from .chunk import krr_attention_torch
from .naive import naive_krr_attention

__all__ = ["krr_attention_torch", "naive_krr_attention"]
