"""The ``versatile`` channel mixer: VersatileFFN ("Achieving Parameter Efficiency in LLMs via Adaptive Wide-and-Deep
Reuse"). One SwiGLU FFN serves two paths; all extra capacity comes from compute, none from new FFN weights.

- **width path**: the FFN's ``I`` neurons are ``virtual_experts`` consecutive groups (virtual sub-experts, no copies;
  as equal as ``I`` allows, the first ``I % virtual_experts`` one neuron wider); a router
  picks ``top_k`` groups per token, weighted ``k · softmax(τ · chosen logits)`` (``τ`` learned, 0 at first: every
  chosen group weighs 1, so ``top_k = virtual_experts`` is the dense FFN exactly);
- **depth path**: the same whole FFN applied again to its own refinement, ``h₁ = f(x)``, ``h_{d+1} = f(x + h_d)``,
  up to ``max_depth`` applications: more compute for hard tokens;
- **difficulty gate**: ``p = σ(w · x + b)`` per token; a token takes the depth path when ``p > ½``, else the width path.
  The choice is hard in the forward pass (training and inference alike: what trains is what runs) and the gradient
  reaches the gate straight through (``choice + p − p.detach()``). ``b`` starts at ``gate_bias_init`` (−4: the width
  path), so a dense checkpoint's FFN loads key for key (``gate_proj`` / ``up_proj`` / ``down_proj``) and, with every
  group chosen, the model starts as the dense one.

Inference computes each token's own path only. Options in ``config.mixer_options["versatile"]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .mixer_registry import mixer_options, register_channel_mixer
from .mlp import neuron_group_index, neuron_groups

__all__ = ["VersatileFFN", "VersatileOptions"]


@dataclass(frozen=True)
class VersatileOptions:
    virtual_experts: int = 4
    top_k: int = 2
    max_depth: int = 2
    gate_bias_init: float = -4.0

    def __post_init__(self) -> None:
        for name, minimum in (("virtual_experts", 1), ("top_k", 1), ("max_depth", 2)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                raise ValueError(f"mixer_options['versatile'].{name} must be an integer >= {minimum}, got {value!r}")
        if self.top_k > self.virtual_experts:
            raise ValueError(f"mixer_options['versatile'].top_k ({self.top_k}) is larger than virtual_experts "
                             f"({self.virtual_experts})")


@register_channel_mixer("versatile")
class VersatileFFN(nn.Module):
    # read by peft_utils: the FFN's projections map from a dense checkpoint; the router and gate are new
    lora_targets = ("gate_proj", "up_proj", "down_proj")
    new_parameters = ("router_weight", "router_temperature", "gate_weight", "gate_bias")
    routes_tokens = False  # called as mixer(x), returns the output

    def __init__(self, config, layer_idx: int) -> None:
        super().__init__()
        options = mixer_options(config, "versatile", VersatileOptions)
        I, H = config.intermediate_size, config.hidden_size
        neuron_groups(I, options.virtual_experts, "mixer_options['versatile'].virtual_experts")  # refuses empty groups
        self.layer_idx = layer_idx
        self.options = options
        self.gate_proj = nn.Linear(H, I, bias=False)
        self.up_proj = nn.Linear(H, I, bias=False)
        self.down_proj = nn.Linear(I, H, bias=False)
        self.router_weight = nn.Parameter(torch.empty(options.virtual_experts, H))
        self.router_temperature = nn.Parameter(torch.empty(()))
        self.gate_weight = nn.Parameter(torch.empty(H))
        self.gate_bias = nn.Parameter(torch.empty(()))
        self._std = config.initializer_range
        self.last_depth_share: float | None = None

    def init_parameters(self, init) -> None:
        init.normal_(self.router_weight, mean=0.0, std=self._std)
        init.zeros_(self.router_temperature)
        init.zeros_(self.gate_weight)
        init.constant_(self.gate_bias, self.options.gate_bias_init)

    def ffn(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

    def depth_path(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ffn(x)
        for _ in range(self.options.max_depth - 1):
            h = self.ffn(x + h)
        return h

    def width_path(self, x: torch.Tensor) -> torch.Tensor:
        """``[N, H]``: the chosen neuron groups' sum, each weighted ``k · softmax(τ · chosen logits)``."""
        G, k = self.options.virtual_experts, self.options.top_k
        logits = F.linear(x.float(), self.router_weight.float())
        top_logits, chosen = logits.topk(k, dim=-1)
        weights = (k * (self.router_temperature.float() * top_logits).softmax(dim=-1)).to(x.dtype)  # [N, k]
        activation = F.silu(self.gate_proj(x)) * self.up_proj(x)  # [N, I]
        mask = torch.zeros(x.shape[0], G, dtype=x.dtype, device=x.device).scatter(-1, chosen, weights)
        group = neuron_group_index(activation.shape[-1], G, device=x.device)
        scaled = activation * mask.index_select(-1, group)  # neurons of unchosen groups weigh 0
        return self.down_proj(scaled)

    def difficulty(self, x: torch.Tensor) -> torch.Tensor:
        """``[...]`` fp32: ``p``, the probability of the depth path."""
        return torch.sigmoid(x.float() @ self.gate_weight.float() + self.gate_bias.float())

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        flat = hidden_states.reshape(-1, hidden_states.shape[-1])
        p = self.difficulty(flat)
        deep = p > 0.5
        if torch.compiler.is_compiling() and not self.training:  # no data-dependent row counts in a traced graph
            return torch.where(deep[:, None], self.depth_path(flat), self.width_path(flat)).view_as(hidden_states)
        self.last_depth_share = float(deep.float().mean()) if deep.numel() else None
        if self.training:  # both paths on every token; the hard choice forward, the gate's gradient straight through
            choice = (deep.to(p.dtype) + p - p.detach()).to(flat.dtype)[:, None]
            out = choice * self.depth_path(flat) + (1 - choice) * self.width_path(flat)
            return out.view_as(hidden_states)
        out = torch.empty_like(flat)
        for rows, path in ((deep.nonzero(as_tuple=True)[0], self.depth_path),
                           ((~deep).nonzero(as_tuple=True)[0], self.width_path)):
            if rows.numel():
                out[rows] = path(flat.index_select(0, rows))
        return out.view_as(hidden_states)
