"""``pre_gated``: Read-ME's router decoupled from the backbone. The model's pre-gate (``layers/pre_gate.py``) turns
the token embeddings into every sparse layer's logits before the first layer runs; this per-layer router only
reads its layer's slice (passed in place of the previous layer's logits) and picks the top-k, weighted
``softmax(τ · chosen logits)`` with a learned ``τ`` (as ``tempered_topk``: ``τ = 0`` weighs the chosen equally, so a
partitioned dense FFN with every expert active stays exact whatever the pre-gate says)."""

from __future__ import annotations

import torch

from .base import Routing, register_moe_router
from .tempered_topk import TemperedTopKRouter


@register_moe_router("pre_gated")
class PreGatedRouter(TemperedTopKRouter):
    config_options = ("moe_pre_gate_hidden",)

    def __init__(self, config, num_routed: int, gating_residual: bool) -> None:
        super().__init__(config, num_routed, gating_residual)
        del self.weight  # the logits come from the model's pre-gate

    def init_parameters(self, init) -> None:
        init.ones_(self.temperature)
        if self.bias is not None:
            init.zeros_(self.bias)

    def forward(self, x: torch.Tensor, planned_logits: torch.Tensor | None = None) -> Routing:
        if planned_logits is None:
            raise ValueError("moe_router='pre_gated': this layer's logits come from the model's pre-gate "
                             "(model.pre_gate), which did not run; call the whole model, not the layer alone")
        logits = planned_logits.reshape(x.shape[0], -1).to(torch.promote_types(x.dtype, torch.float32))
        if self.bias is not None:
            logits = logits + self.bias.to(logits.dtype)
        return self.route(logits)
