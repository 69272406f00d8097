"""``tempered_topk``: the k largest logits choose the experts; their weights are ``softmax(τ · logits)`` over the k,
with a learned temperature ``τ`` (a scalar per layer).

With ``τ = 0`` the chosen experts are weighted equally, so a model whose FFN neurons were partitioned into experts
computes exactly the dense FFN when every expert is active (weights ``1/k`` times the routed scale ``k``), whatever
the router rows are: the rows can start informative (what a conversion learns from calibration text) without
breaking exactness. Training moves ``τ`` away from 0, and the weights then follow the logits as in
``softmax_topk``. Models built from scratch start at ``τ = 1``.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import MoERouter, Routing, register_moe_router


@register_moe_router("tempered_topk")
class TemperedTopKRouter(MoERouter):
    config_options = ()  # always renormalised over the k (softmax over the chosen logits)

    def __init__(self, config, num_routed: int, gating_residual: bool) -> None:
        super().__init__(config, num_routed, gating_residual)
        self.temperature = nn.Parameter(torch.empty(()))

    def init_parameters(self, init) -> None:
        super().init_parameters(init)
        init.ones_(self.temperature)

    @staticmethod
    def probabilities(logits: torch.Tensor) -> torch.Tensor:
        return logits.softmax(dim=-1)

    def route(self, logits: torch.Tensor) -> Routing:
        N = logits.shape[0]
        top_logits, top_experts = logits.topk(self.top_k, dim=-1)
        weights = (self.temperature.to(logits.dtype) * top_logits).softmax(dim=-1)
        token_idx = torch.arange(N, device=logits.device).repeat_interleave(self.top_k)
        return Routing(logits, token_idx, top_experts.reshape(-1), weights.reshape(-1))
