"""``activation_dense_to_sparse``: the dense-to-sparse gate. ``g = softmax(act(x W) / τ)`` (linear → activation →
softmax); every expert with ``g ≥ moe_router_threshold`` is active with weight ``g`` (the best expert always).

``τ`` is a buffer (``temperature``) that starts at ``moe_router_temperature``: a high temperature spreads the gate
over every expert (dense, each trains on every token), and lowering it during training (``DenseToSparseAnnealing``,
a Trainer callback) concentrates the gate until most experts fall below the threshold (sparse). The temperature
reached is saved with the weights, so inference runs at the sparsity training ended with. The reported logits are
``act(x W) / τ``, so ``softmax`` of them is the gate.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import MoERouter, Routing, register_moe_router

ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh, "identity": lambda x: x}


@register_moe_router("activation_dense_to_sparse")
class DenseToSparseRouter(MoERouter):
    config_options = ("moe_router_activation", "moe_router_temperature", "moe_router_threshold")
    fixed_top_k = False

    def __init__(self, config, num_routed: int, gating_residual: bool) -> None:
        super().__init__(config, num_routed, gating_residual)
        self.activation = ACTIVATIONS[config.moe_router_activation]
        self.threshold = config.moe_router_threshold
        self._initial_temperature = config.moe_router_temperature
        self.register_buffer("temperature", torch.tensor(float(config.moe_router_temperature)), persistent=True)

    def init_parameters(self, init) -> None:
        super().init_parameters(init)
        self.temperature.fill_(self._initial_temperature)

    def score(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return self.activation(F.linear(x, weight)) / self.temperature.to(x.dtype)

    @staticmethod
    def probabilities(logits: torch.Tensor) -> torch.Tensor:
        return logits.softmax(dim=-1)

    @staticmethod
    def selected(logits: torch.Tensor, top_k: int, config=None) -> torch.Tensor:
        gate = logits.softmax(dim=-1)
        threshold = 0.0 if config is None else config.moe_router_threshold
        best = torch.zeros_like(gate, dtype=torch.bool).scatter_(-1, gate.argmax(dim=-1, keepdim=True), True)
        return (gate >= threshold) | best

    def route(self, logits: torch.Tensor) -> Routing:
        gate = logits.softmax(dim=-1)
        best = torch.zeros_like(gate, dtype=torch.bool).scatter_(-1, gate.argmax(dim=-1, keepdim=True), True)
        active = (gate >= self.threshold) | best
        token_idx, expert_idx = active.nonzero(as_tuple=True)
        return Routing(logits, token_idx, expert_idx, gate[token_idx, expert_idx])
