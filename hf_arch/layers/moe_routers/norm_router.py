"""``norm_router``: logits ``scale · cos(x, w_e)``, then as ``softmax_topk``. Independent of ``‖x‖`` and of the router
rows' norms, so routing stays stable as activations grow (our reading of UniPool's NormRouter)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import register_moe_router
from .softmax_topk import SoftmaxTopKRouter


@register_moe_router("norm_router")
class NormRouter(SoftmaxTopKRouter):
    config_options = ("moe_norm_topk_prob", "moe_norm_router_scale")

    def __init__(self, config, num_routed: int, gating_residual: bool) -> None:
        super().__init__(config, num_routed, gating_residual)
        self.scale = nn.Parameter(torch.empty(()))
        self._initial_scale = config.moe_norm_router_scale

    def init_parameters(self, init) -> None:
        super().init_parameters(init)
        init.constant_(self.scale, self._initial_scale)

    def score(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return self.scale.to(x.dtype) * F.linear(F.normalize(x, dim=-1), F.normalize(weight, dim=-1))
