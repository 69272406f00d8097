"""STILL's intra-layer hybrid attention (salient tokens by softmax, the rest by linear attention)."""

from .naive import naive_still_attention, select_salient, self_saliency

__all__ = ["naive_still_attention", "select_salient", "self_saliency"]
