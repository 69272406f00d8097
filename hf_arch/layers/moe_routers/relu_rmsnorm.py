"""``relu_rmsnorm`` (BlockFFN): ``a = ReLU(logits)``, weights ``RMSNorm(a)`` over experts; every expert with ``a > 0``
is active, so the number of experts per token varies and routing is differentiable."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import MoERouter, Routing, register_moe_router


@register_moe_router("relu_rmsnorm")
class ReLURMSNormRouter(MoERouter):
    fixed_top_k = False

    def __init__(self, config, num_routed: int, gating_residual: bool) -> None:
        super().__init__(config, num_routed, gating_residual)
        self.eps = config.rms_norm_eps
        self.norm_weight = nn.Parameter(torch.empty(num_routed))

    def init_parameters(self, init) -> None:
        super().init_parameters(init)
        init.ones_(self.norm_weight)

    def route(self, logits: torch.Tensor) -> Routing:
        N = logits.shape[0]
        active = F.relu(logits)
        rms = active.pow(2).mean(dim=-1, keepdim=True).add(self.eps).rsqrt()
        weights = active * rms * self.norm_weight.to(logits.dtype)
        if torch.compiler.is_compiling():
            # A traced graph cannot hold a data-dependent count of active pairs: every (token, expert) pair, the
            # inactive ones weighted 0 (exact, at dense cost).
            E = logits.shape[1]
            token_idx = torch.arange(N, device=logits.device).repeat_interleave(E)
            return Routing(logits, token_idx, torch.arange(E, device=logits.device).repeat(N), weights.reshape(-1))
        token_idx, expert_idx = (active > 0).nonzero(as_tuple=True)
        return Routing(logits, token_idx, expert_idx, weights[token_idx, expert_idx])

    @staticmethod
    def probabilities(logits: torch.Tensor) -> torch.Tensor:
        scores = F.relu(logits)
        return scores / scores.sum(dim=-1, keepdim=True).clamp_min(1e-9)

    @staticmethod
    def selected(logits: torch.Tensor, top_k: int, config=None) -> torch.Tensor:
        return logits > 0
