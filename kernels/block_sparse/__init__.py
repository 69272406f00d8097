"""Block-sparse causal attention (SeerAttention-style learned sparsity) and block-pooled attention scores."""

from .chunk import chunk_block_sparse_attention
from .naive import naive_block_sparse_attention, naive_pooled_attention_scores
from .pooled_scores import chunk_pooled_attention_scores

__all__ = [
    "chunk_block_sparse_attention",
    "chunk_pooled_attention_scores",
    "naive_block_sparse_attention",
    "naive_pooled_attention_scores",
]
