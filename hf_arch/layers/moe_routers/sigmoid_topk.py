"""``sigmoid_topk``: ``s = σ(logits)``, the k largest; weights ``s`` (renormalised over the k if asked)."""

from __future__ import annotations

import torch

from .base import TopKRouter, register_moe_router


@register_moe_router("sigmoid_topk")
class SigmoidTopKRouter(TopKRouter):
    @staticmethod
    def activate(logits: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(logits)

    @staticmethod
    def probabilities(logits: torch.Tensor) -> torch.Tensor:
        scores = torch.sigmoid(logits)
        return scores / scores.sum(dim=-1, keepdim=True).clamp_min(1e-9)
