"""``stochastic``: THOR's stochastic experts. In training every token goes to ``k`` experts drawn uniformly at random
(no learned gate, weights ``1/k``); the model pairs two such passes with a consistency loss (``moe_consistency_coef``,
applied by ``HfArchForCausalLM.forward``), so the experts learn to agree and any of them can serve any token.

At inference THOR also routes at random. Here the draw is a fixed random projection of the token (``projection``, a
saved buffer drawn at initialisation, never trained): still an assignment no gate learned, but the same token routes
the same way in any batch and in cached decoding, so generation is reproducible and decode equals the full forward.

The layer reports zero logits: a uniform routing distribution, which is what the draw is (statistics come from the
assignments themselves, and no balance loss applies).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import MoERouter, Routing, register_moe_router


@register_moe_router("stochastic")
class StochasticRouter(MoERouter):
    config_options = ("moe_consistency_coef",)
    new_parameters = ()  # nothing to train
    balance_loss = False

    def __init__(self, config, num_routed: int, gating_residual: bool) -> None:
        super().__init__(config, num_routed, gating_residual)
        if self.residual_proj is not None or self.bias is not None:
            raise ValueError("moe_router='stochastic' has no learned gate: moe_gating_residual and moe_router_bias "
                             "do not apply")
        del self.weight
        # Drawn here (the model's init only visits modules with parameters of their own, and this one has none).
        self.register_buffer("projection", torch.randn(num_routed, config.hidden_size), persistent=True)

    def init_parameters(self, init) -> None:
        init.normal_(self.projection, mean=0.0, std=1.0)

    @staticmethod
    def probabilities(logits: torch.Tensor) -> torch.Tensor:
        return torch.full_like(logits, 1.0 / logits.shape[-1])

    def forward(self, x: torch.Tensor, previous_logits: torch.Tensor | None = None) -> Routing:
        N, E = x.shape[0], self.projection.shape[0]
        if self.training:
            scores = torch.rand(N, E, device=x.device)
        else:
            dtype = torch.promote_types(x.dtype, torch.float32)
            scores = F.linear(x.to(dtype), self.projection.to(dtype))
        top_experts = scores.topk(self.top_k, dim=-1).indices
        token_idx = torch.arange(N, device=x.device).repeat_interleave(self.top_k)
        weight = x.new_full((N * self.top_k,), 1.0 / self.top_k, dtype=torch.promote_types(x.dtype, torch.float32))
        logits = x.new_zeros(N, E, dtype=torch.promote_types(x.dtype, torch.float32))
        return Routing(logits, token_idx, top_experts.reshape(-1), weight)
