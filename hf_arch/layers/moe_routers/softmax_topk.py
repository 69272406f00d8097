"""``softmax_topk``: ``p = softmax(logits)``, the k largest; weights ``p`` (renormalised over the k if asked)."""

from __future__ import annotations

import torch

from .base import TopKRouter, register_moe_router


@register_moe_router("softmax_topk")
class SoftmaxTopKRouter(TopKRouter):
    @staticmethod
    def activate(logits: torch.Tensor) -> torch.Tensor:
        return logits.softmax(dim=-1)

    @staticmethod
    def probabilities(logits: torch.Tensor) -> torch.Tensor:
        return logits.softmax(dim=-1)
