"""MoE routers, one class per file, registered by name (``config.moe_router``). A new router: subclass
:class:`MoERouter` (or :class:`TopKRouter`) in a file of its own and decorate it with ``@register_moe_router(name)``;
nothing else changes. See ``base.py``."""

from __future__ import annotations

import torch

from .base import MOE_ROUTERS, MoERouter, Routing, TopKRouter, register_moe_router, router_class
from .dense_to_sparse import DenseToSparseRouter
from .dynamic_topk import DynamicTopKRouter
from .norm_router import NormRouter
from .pre_gated import PreGatedRouter
from .relu_rmsnorm import ReLURMSNormRouter
from .sigmoid_topk import SigmoidTopKRouter
from .sinkhorn import SinkhornRouter
from .softmax_topk import SoftmaxTopKRouter
from .sqrt_gate import SqrtGateRouter
from .stochastic import StochasticRouter
from .tempered_topk import TemperedTopKRouter

__all__ = ["MOE_ROUTERS", "DenseToSparseRouter", "DynamicTopKRouter", "MoERouter", "NormRouter", "PreGatedRouter",
           "ReLURMSNormRouter",
           "Routing", "SigmoidTopKRouter", "SinkhornRouter", "SoftmaxTopKRouter", "SqrtGateRouter", "StochasticRouter",
           "TemperedTopKRouter", "TopKRouter", "register_moe_router", "router_class", "routing_probabilities",
           "selected_mask"]


def routing_probabilities(logits: torch.Tensor, router: str) -> torch.Tensor:
    """Each token's routing distribution over experts under router ``router`` (rows sum to 1)."""
    return router_class(router).probabilities(logits)


def selected_mask(logits: torch.Tensor, router: str, top_k: int, config=None) -> torch.Tensor:
    """``[..., E]`` bool: which experts each token uses under router ``router`` with capacity ``top_k`` (``config``:
    the settings of routers whose rule has some)."""
    return router_class(router).selected(logits, top_k, config)
