"""``dynamic_topk``: DynaMoE's per-token number of experts. ``p = softmax(logits)``; each token takes its ``k_t``
most probable experts, ``1 ≤ k_t ≤`` the layer's capacity (``num_experts_per_tok``, or the layer's share of it under
``moe_capacity_schedule``), by the rule ``moe_dynamic_k``:

- ``threshold``: the fewest experts whose probabilities add up to ``moe_dynamic_threshold`` (a confident token needs
  one, an ambiguous one more);
- ``complexity``: ``1 + round((capacity − 1) · H(p) / log E)``, the normalised routing entropy as the token's
  complexity.

Weights are the chosen probabilities, renormalised over the chosen if ``moe_norm_topk_prob``.
"""

from __future__ import annotations

import math

import torch

from .base import MoERouter, Routing, register_moe_router


def experts_per_token(probs: torch.Tensor, capacity: int, rule: str, threshold: float) -> torch.Tensor:
    """``[N]`` long: how many of its most probable experts each token uses."""
    E = probs.shape[-1]
    if rule == "threshold":
        ordered = probs.sort(dim=-1, descending=True).values
        # experts before the cumulative sum reaches the threshold, plus the one that reaches it
        count = (ordered.cumsum(dim=-1) - ordered < threshold).sum(dim=-1)
    elif rule == "complexity":
        entropy = -(probs * probs.clamp_min(1e-12).log()).sum(dim=-1)
        share = (entropy / math.log(E)).clamp(0.0, 1.0) if E > 1 else torch.zeros_like(entropy)
        count = 1 + torch.floor((capacity - 1) * share + 0.5).long()
    else:
        raise ValueError(f"moe_dynamic_k must be 'threshold' or 'complexity', got {rule!r}")
    return count.clamp(1, capacity)


def dynamic_selection(probs: torch.Tensor, capacity: int, rule: str, threshold: float) -> torch.Tensor:
    """``[..., E]`` bool: each token's chosen experts (its ``k_t`` most probable, ties as ``torch.topk``)."""
    flat = probs.reshape(-1, probs.shape[-1])
    count = experts_per_token(flat, capacity, rule, threshold)
    index = flat.topk(capacity, dim=-1).indices  # [N, capacity], most probable first
    keep = torch.arange(capacity, device=flat.device)[None, :] < count[:, None]
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask.scatter_(-1, index, keep)
    return mask.view(probs.shape)


@register_moe_router("dynamic_topk")
class DynamicTopKRouter(MoERouter):
    config_options = ("moe_norm_topk_prob", "moe_dynamic_k", "moe_dynamic_threshold")
    fixed_top_k = False
    caps_top_k = True

    def __init__(self, config, num_routed: int, gating_residual: bool) -> None:
        super().__init__(config, num_routed, gating_residual)
        self.norm_topk_prob = config.moe_norm_topk_prob
        self.rule = config.moe_dynamic_k
        self.threshold = config.moe_dynamic_threshold

    @staticmethod
    def probabilities(logits: torch.Tensor) -> torch.Tensor:
        return logits.softmax(dim=-1)

    @staticmethod
    def selected(logits: torch.Tensor, top_k: int, config=None) -> torch.Tensor:
        rule = "threshold" if config is None else config.moe_dynamic_k
        threshold = 0.5 if config is None else config.moe_dynamic_threshold
        return dynamic_selection(logits.softmax(dim=-1), top_k, rule, threshold)

    def route(self, logits: torch.Tensor) -> Routing:
        probs = logits.softmax(dim=-1)
        mask = dynamic_selection(probs, self.top_k, self.rule, self.threshold)
        token_idx, expert_idx = mask.nonzero(as_tuple=True)
        weight = probs[token_idx, expert_idx]
        if self.norm_topk_prob:
            total = (probs * mask).sum(dim=-1).clamp_min(1e-9)
            weight = weight / total[token_idx]
        return Routing(logits, token_idx, expert_idx, weight)
