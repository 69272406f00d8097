"""What every MoE router shares: the routing record, the expert-score matrix and its logits, and the registry.

A router is a class in its own file, registered by name (``@register_moe_router("name")``); ``config.moe_router``
picks one. It turns fp32 ``logits [N, E]`` over all routed experts (FFN experts, then zero-computation ones) into
assignments ``(token, expert, weight)``; routing statistics and auxiliary losses are computed later from the logits
alone, through the class's ``probabilities`` / ``selected`` rules. MoE++ gating residuals add ``W_g · logits_prev``
(the previous sparse layer's logits) before the rule.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ...configuration import MoERouterSpec, register_moe_router_spec

__all__ = ["MOE_ROUTERS", "MoERouter", "Routing", "register_moe_router", "router_class"]

MOE_ROUTERS: dict[str, type] = {}


@dataclass
class Routing:
    """One layer's routing of ``N`` tokens: ``logits [N, E]`` (fp32 or wider) and the assignments, by token."""

    logits: torch.Tensor
    token_idx: torch.LongTensor
    expert_idx: torch.LongTensor
    weight: torch.Tensor

    def selected_mask(self) -> torch.Tensor:
        """``[N, E]`` bool: the experts each token was sent to (whatever rule chose them)."""
        mask = torch.zeros(self.logits.shape, dtype=torch.bool, device=self.logits.device)
        mask[self.token_idx, self.expert_idx] = True
        return mask


def register_moe_router(name: str):
    """Class decorator: make ``cls`` the router ``config.moe_router = name`` builds (and tell the config which
    options it reads: ``cls.config_options``; ``cls.fixed_top_k``, ``cls.caps_top_k``, ``cls.balance_loss``)."""

    def add(cls):
        cls.name = name
        MOE_ROUTERS[name] = cls
        register_moe_router_spec(name, MoERouterSpec(options=tuple(cls.config_options), fixed_top_k=cls.fixed_top_k,
                                                     balance_loss=cls.balance_loss, caps_top_k=cls.caps_top_k))
        return cls

    return add


def router_class(name: str) -> type:
    if name not in MOE_ROUTERS:
        raise ValueError(f"moe_router={name!r} is not a registered router; registered: {sorted(MOE_ROUTERS)}")
    return MOE_ROUTERS[name]


class MoERouter(nn.Module):
    """Router of one sparse layer over ``num_routed`` experts (``config.num_routed_experts``).

    ``MoERouter(config, ...)`` builds the class registered for ``config.moe_router``. Subclasses implement
    ``route(logits)`` and the two rules below, and may add parameters (``init_parameters``) or change the logits
    (``score``)."""

    new_parameters = ("*",)  # read by peft_utils
    config_options: tuple[str, ...] = ()  # config fields only this router reads
    fixed_top_k = True  # False: the number of experts per token varies (num_experts_per_tok unused, unless capped)
    caps_top_k = False  # True: num_experts_per_tok (the layer's capacity) caps the varying number
    balance_loss = True  # False: no learned assignment to balance (random routing)

    def __new__(cls, config=None, *args, **kwargs):
        if cls is MoERouter and config is not None:
            cls = router_class(config.moe_router)
        return super().__new__(cls)

    def __init__(self, config, num_routed: int, gating_residual: bool) -> None:
        super().__init__()
        self.kind = config.moe_router
        self.top_k = config.num_experts_per_tok
        self.weight = nn.Parameter(torch.empty(num_routed, config.hidden_size))
        # MoE++ gating residual: a map from the previous sparse layer's logits (zero at init).
        self.residual_proj = nn.Linear(num_routed, num_routed, bias=False) if gating_residual else None
        self.bias = nn.Parameter(torch.empty(num_routed)) if config.moe_router_bias else None
        self._std = config.initializer_range

    def init_parameters(self, init) -> None:
        init.normal_(self.weight, mean=0.0, std=self._std)
        if self.residual_proj is not None:
            init.zeros_(self.residual_proj.weight)
        if self.bias is not None:
            init.zeros_(self.bias)

    def score(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """``[N, E]`` expert scores before bias and gating residual (a linear map; NormRouter: scaled cosine)."""
        return F.linear(x, weight)

    def compute_logits(self, x: torch.Tensor, previous_logits: torch.Tensor | None = None) -> torch.Tensor:
        """``[N, E]`` logits for ``x [N, H]`` in fp32 at least (routing decisions are precision-sensitive; the matmul
        is tiny)."""
        dtype = torch.promote_types(x.dtype, torch.float32)
        logits = self.score(x.to(dtype), self.weight.to(dtype))
        if self.bias is not None:
            logits = logits + self.bias.to(dtype)
        if self.residual_proj is not None and previous_logits is not None:
            logits = logits + F.linear(previous_logits.to(dtype), self.residual_proj.weight.to(dtype))
        return logits

    def forward(self, x: torch.Tensor, previous_logits: torch.Tensor | None = None) -> Routing:
        return self.route(self.compute_logits(x, previous_logits))

    def route(self, logits: torch.Tensor) -> Routing:
        raise NotImplementedError

    @staticmethod
    def probabilities(logits: torch.Tensor) -> torch.Tensor:
        """Each token's routing distribution over experts (rows sum to 1): what load balancing calls ``P``."""
        raise NotImplementedError

    @staticmethod
    def selected(logits: torch.Tensor, top_k: int, config=None) -> torch.Tensor:
        """``[..., E]`` bool: which experts each token uses (ties broken as ``torch.topk`` breaks them); ``top_k`` is
        the layer's capacity, ``config`` carries the rule's settings for routers that have some."""
        index = logits.topk(top_k, dim=-1).indices
        return torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, index, True)


class TopKRouter(MoERouter):
    """The k best experts by ``activate(logits)``; weights renormalised over the k if ``moe_norm_topk_prob``."""

    config_options = ("moe_norm_topk_prob",)

    def __init__(self, config, num_routed: int, gating_residual: bool) -> None:
        super().__init__(config, num_routed, gating_residual)
        self.norm_topk_prob = config.moe_norm_topk_prob

    @staticmethod
    def activate(logits: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @classmethod
    def selected(cls, logits: torch.Tensor, top_k: int, config=None) -> torch.Tensor:
        """The experts ``route`` picks: the k largest activated scores (not logits: a saturating activation ties)."""
        index = cls.activate(logits).topk(top_k, dim=-1).indices
        return torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, index, True)

    def route(self, logits: torch.Tensor) -> Routing:
        N = logits.shape[0]
        top_scores, top_experts = self.activate(logits).topk(self.top_k, dim=-1)
        if self.norm_topk_prob:
            top_scores = top_scores / top_scores.sum(dim=-1, keepdim=True).clamp_min(1e-9)
        token_idx = torch.arange(N, device=logits.device).repeat_interleave(self.top_k)
        return Routing(logits, token_idx, top_experts.reshape(-1), top_scores.reshape(-1))
