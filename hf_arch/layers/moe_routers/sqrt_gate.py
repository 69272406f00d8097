"""``sqrt_gate``: HyperP's SqrtGate. Softmax top-k, weights ``√(p_i / Σ_k p)``.

A renormalised top-k gate has ``Σ w = 1``; if the k experts' outputs are roughly independent with RMS ``r``, the
layer's output RMS is ``r·√(Σ w²)``, which shrinks as ``1/√k`` when experts get finer and more of them are active.
Square-root weights have ``Σ w² = 1``, so the output RMS stays ``r`` at any granularity.
"""

from __future__ import annotations

import torch

from .base import Routing, register_moe_router
from .softmax_topk import SoftmaxTopKRouter


@register_moe_router("sqrt_gate")
class SqrtGateRouter(SoftmaxTopKRouter):
    config_options = ()  # always renormalised over the k before the square root

    def __init__(self, config, num_routed: int, gating_residual: bool) -> None:
        super().__init__(config, num_routed, gating_residual)
        self.norm_topk_prob = True

    def route(self, logits: torch.Tensor) -> Routing:
        routing = super().route(logits)
        routing.weight = routing.weight.clamp_min(1e-12).sqrt()  # an underflowed weight must not give an infinite gradient
        return routing

