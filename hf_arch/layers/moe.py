"""The ``sparse`` channel mixer: router → FFN experts (+ MoE++ zero-computation experts) → weighted sum,
plus an optional always-on shared expert.

    x ─ router ─ (token, expert, weight) ─┬─ FFN experts (own or the global pool): grouped SwiGLU ─┐
      │                                   └─ zero / copy / constant experts (no matmul) ───────────┼─ Σ weight·y ─┐
      └─ shared expert · [σ(x w_s)] ────────────────────────────────────────────────────────────────────────────┴─ out

The layer returns its router logits too: the next sparse layer reads them (gating residuals), and the model turns
them into auxiliary losses and routing statistics.
"""

from __future__ import annotations

import torch
from torch import nn

from .mixer_registry import register_channel_mixer
from .mlp import HfArchMLP
from .moe_experts import HfArchExperts, ZeroComputationExperts
from ..configuration import moe_layer_capacity, moe_sparse_index
from .moe_routers import MoERouter

__all__ = ["HfArchMoE"]


@register_channel_mixer("sparse")
class HfArchMoE(nn.Module):
    # Read by peft_utils: the router and experts declare themselves; the shared expert is an HfArchMLP (its
    # projections are LoRA targets, copied from the dense FFN by a conversion); its gate is new.
    new_parameters = ("shared_expert_gate",)
    routes_tokens = True  # called with (x, previous router logits, expert pool, token mask); returns its logits too

    def __init__(self, config, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.router_kind = config.moe_router
        # DynaMoE's capacity schedule: this layer's experts per token (uniform: num_experts_per_tok).
        self.top_k = moe_layer_capacity(config, moe_sparse_index(config, layer_idx))
        self.num_ffn = config.num_ffn_experts
        self.num_routed = config.num_routed_experts
        self.routed_scale = config.moe_routed_scale
        first_sparse = config.mlp_layer_types.index("sparse")
        self.router = MoERouter(config, self.num_routed, config.moe_gating_residual and layer_idx > first_sparse)
        self.router.top_k = self.top_k
        # A global pool lives on the model and arrives through forward(experts=...).
        self.experts = HfArchExperts(config, config.num_experts) if config.moe_expert_pool == "per_layer" else None
        self.zero_computation = (
            ZeroComputationExperts(config) if config.num_zero_computation_experts else None
        )
        self.shared_expert = (
            HfArchMLP(config, intermediate_size=config.shared_expert_intermediate_size)
            if config.num_shared_experts else None
        )
        self.shared_expert_gate = (
            nn.Linear(config.hidden_size, 1, bias=False) if self.shared_expert is not None and config.shared_expert_gate
            else None
        )
        self.stats = None  # a RoutingStatsAccumulator while statistics are being collected

    def forward(
        self,
        hidden_states: torch.Tensor,
        previous_router_logits: torch.Tensor | None = None,
        experts: nn.Module | None = None,
        token_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``hidden_states [B, T, H]`` → (output ``[B, T, H]``, router logits ``[B, T, E]`` in fp32). ``token_mask``:
        the 2-D padding mask (its last T columns are this call's tokens), for routing statistics."""
        B, T, H = hidden_states.shape
        x = hidden_states.reshape(-1, H)
        previous = previous_router_logits.reshape(B * T, -1) if previous_router_logits is not None else None
        routing = self.router(x, previous)
        experts = self.experts if self.experts is not None else experts
        if experts is None:
            raise ValueError(f"layer {self.layer_idx}: moe_expert_pool='global' but no expert pool was passed")

        tokens, chosen, weight = routing.token_idx, routing.expert_idx, routing.weight
        if self.routed_scale != 1.0:
            weight = weight * self.routed_scale
        zero_computation_out = None
        if self.zero_computation is not None:  # split off what goes to zero-computation experts
            is_ffn = chosen < self.num_ffn
            zero_computation_out = torch.zeros_like(x)
            if torch.compiler.is_compiling():
                # Static shapes for a traced graph: every assignment goes to both sides, weighted 0 where it does not
                # belong (the FFN side sends the others to expert 0 at weight 0).
                zero = torch.zeros_like(weight)
                self.zero_computation(x, tokens, (chosen - self.num_ffn).clamp(min=0),
                                      torch.where(is_ffn, zero, weight), zero_computation_out)
                chosen, weight = torch.where(is_ffn, chosen, 0), torch.where(is_ffn, weight, zero)
            else:
                rest = ~is_ffn
                self.zero_computation(x, tokens[rest], chosen[rest] - self.num_ffn, weight[rest],
                                      zero_computation_out)
                tokens, chosen, weight = tokens[is_ffn], chosen[is_ffn], weight[is_ffn]
        out = experts(x, tokens, chosen, weight)
        if zero_computation_out is not None:
            out = out + zero_computation_out
        if self.shared_expert is not None:
            shared = self.shared_expert(x)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(x)) * shared
            out = out + shared
        logits = routing.logits.view(B, T, -1)
        if self.stats is not None:
            real = token_mask[:, -T:] if token_mask is not None else None
            self.stats.add(self.layer_idx, routing.selected_mask().view(B, T, -1), real)
        return out.view(B, T, H), logits
