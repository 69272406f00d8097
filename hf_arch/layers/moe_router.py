"""MoE routers: token → (experts, weights), one class for the four rules the config names.

Every router produces fp32 ``logits [N, E]`` over all routed experts (FFN experts, then zero-computation ones) and
a flat list of assignments ``(token, expert, weight)``. The rule is a pure function of the logits, so routing
statistics and auxiliary losses are computed later from the logits alone (:func:`routing_probabilities`,
:func:`selected_mask`):

- ``softmax_topk``: ``p = softmax(logits)``, the k largest; weights ``p`` (renormalised over the k if asked).
- ``sigmoid_topk``: ``s = σ(logits)``, the k largest; weights ``s`` (renormalised over the k if asked).
- ``norm_router``: logits are ``scale · cos(x, w_e)``, then as ``softmax_topk``. Independent of ``‖x‖`` and of the
  router rows' norms, so routing stays stable as activations grow (our reading of UniPool's NormRouter).
- ``relu_rmsnorm`` (BlockFFN): ``a = ReLU(logits)``, weights ``RMSNorm(a)`` over experts; every expert with
  ``a > 0`` is active, so the number of experts per token varies and routing is differentiable.

MoE++ gating residuals add ``W_g · logits_prev`` (the previous sparse layer's logits) before the rule.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Routing", "MoERouter", "routing_probabilities", "selected_mask"]

TOPK_ROUTERS = ("softmax_topk", "sigmoid_topk", "norm_router")


@dataclass
class Routing:
    """One layer's routing of ``N`` tokens: ``logits [N, E]`` (fp32 or wider) and the assignments, by token."""

    logits: torch.Tensor
    token_idx: torch.LongTensor
    expert_idx: torch.LongTensor
    weight: torch.Tensor


def routing_probabilities(logits: torch.Tensor, router: str) -> torch.Tensor:
    """Each token's routing distribution over experts (rows sum to 1): what load balancing calls ``P``."""
    if router in ("softmax_topk", "norm_router"):
        return logits.softmax(dim=-1)
    scores = torch.sigmoid(logits) if router == "sigmoid_topk" else F.relu(logits)
    return scores / scores.sum(dim=-1, keepdim=True).clamp_min(1e-9)


def selected_mask(logits: torch.Tensor, router: str, top_k: int) -> torch.Tensor:
    """``[..., E]`` bool: which experts each token uses (ties broken as ``torch.topk`` breaks them)."""
    if router == "relu_rmsnorm":
        return logits > 0
    index = logits.topk(top_k, dim=-1).indices
    return torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, index, True)


class MoERouter(nn.Module):
    """Router of one sparse layer over ``num_routed`` experts (``config.num_routed_experts``)."""

    new_parameters = ("*",)  # read by peft_utils

    def __init__(self, config, num_routed: int, gating_residual: bool) -> None:
        super().__init__()
        self.kind = config.moe_router
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = config.moe_norm_topk_prob
        self.eps = config.rms_norm_eps
        self.weight = nn.Parameter(torch.empty(num_routed, config.hidden_size))
        # MoE++ gating residual: a map from the previous sparse layer's logits (zero at init).
        self.residual_proj = nn.Linear(num_routed, num_routed, bias=False) if gating_residual else None
        self.bias = nn.Parameter(torch.empty(num_routed)) if config.moe_router_bias else None
        self.scale = nn.Parameter(torch.empty(())) if self.kind == "norm_router" else None
        self.norm_weight = nn.Parameter(torch.empty(num_routed)) if self.kind == "relu_rmsnorm" else None
        self._initial_scale = config.moe_norm_router_scale
        self._std = config.initializer_range

    def init_parameters(self, init) -> None:
        init.normal_(self.weight, mean=0.0, std=self._std)
        if self.residual_proj is not None:
            init.zeros_(self.residual_proj.weight)
        if self.bias is not None:
            init.zeros_(self.bias)
        if self.scale is not None:
            init.constant_(self.scale, self._initial_scale)
        if self.norm_weight is not None:
            init.ones_(self.norm_weight)

    def compute_logits(self, x: torch.Tensor, previous_logits: torch.Tensor | None = None) -> torch.Tensor:
        """``[N, E]`` logits for ``x [N, H]`` in fp32 at least (routing decisions are precision-sensitive; the matmul
        is tiny)."""
        dtype = torch.promote_types(x.dtype, torch.float32)
        x, weight = x.to(dtype), self.weight.to(dtype)
        if self.kind == "norm_router":
            logits = self.scale.to(dtype) * F.linear(F.normalize(x, dim=-1), F.normalize(weight, dim=-1))
        else:
            logits = F.linear(x, weight)
        if self.bias is not None:
            logits = logits + self.bias.to(dtype)
        if self.residual_proj is not None and previous_logits is not None:
            logits = logits + F.linear(previous_logits.to(dtype), self.residual_proj.weight.to(dtype))
        return logits

    def forward(self, x: torch.Tensor, previous_logits: torch.Tensor | None = None) -> Routing:
        logits = self.compute_logits(x, previous_logits)
        N = logits.shape[0]
        if self.kind == "relu_rmsnorm":
            active = F.relu(logits)
            rms = active.pow(2).mean(dim=-1, keepdim=True).add(self.eps).rsqrt()
            weights = active * rms * self.norm_weight.to(logits.dtype)
            if torch.compiler.is_compiling():
                # A traced graph cannot hold a data-dependent count of active pairs: every (token, expert) pair,
                # the inactive ones weighted 0 (exact, at dense cost).
                E = logits.shape[1]
                token_idx = torch.arange(N, device=logits.device).repeat_interleave(E)
                return Routing(logits, token_idx, torch.arange(E, device=logits.device).repeat(N), weights.reshape(-1))
            token_idx, expert_idx = (active > 0).nonzero(as_tuple=True)
            return Routing(logits, token_idx, expert_idx, weights[token_idx, expert_idx])
        scores = torch.sigmoid(logits) if self.kind == "sigmoid_topk" else logits.softmax(dim=-1)
        top_scores, top_experts = scores.topk(self.top_k, dim=-1)
        if self.norm_topk_prob:
            top_scores = top_scores / top_scores.sum(dim=-1, keepdim=True).clamp_min(1e-9)
        token_idx = torch.arange(N, device=logits.device).repeat_interleave(self.top_k)
        return Routing(logits, token_idx, top_experts.reshape(-1), top_scores.reshape(-1))
