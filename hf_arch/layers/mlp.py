"""Channel mixer ``dense``: the SwiGLU-style MLP of the Llama family (also the MoE layer's shared expert)."""

from __future__ import annotations

import torch
from torch import nn
from transformers.activations import ACT2FN

from .mixer_registry import register_channel_mixer


def neuron_groups(intermediate_size: int, groups: int, option: str) -> list[int]:
    """Widths of ``groups`` consecutive neuron groups covering an FFN of ``intermediate_size``: as equal as can be,
    the first ``intermediate_size % groups`` one neuron wider (any source width splits; none is dropped)."""
    if groups > intermediate_size:
        raise ValueError(f"{option} ({groups}) is larger than intermediate_size ({intermediate_size}): a group would "
                         "hold no neuron")
    base, extra = divmod(intermediate_size, groups)
    return [base + (j < extra) for j in range(groups)]


def neuron_group_index(intermediate_size: int, groups: int, device=None) -> torch.Tensor:
    """``[intermediate_size]`` long: the group of every neuron under :func:`neuron_groups` (computed, not stored, so
    static shapes and no buffer in checkpoints)."""
    base, extra = divmod(intermediate_size, groups)
    neuron = torch.arange(intermediate_size, device=device)
    wide = extra * (base + 1)  # neurons in the wider groups
    return torch.where(neuron < wide, neuron // (base + 1), extra + (neuron - wide) // max(base, 1))


@register_channel_mixer("dense")
class HfArchMLP(nn.Module):
    lora_targets = ("gate_proj", "up_proj", "down_proj")  # read by peft_utils
    routes_tokens = False

    def __init__(self, config, layer_idx: int | None = None, intermediate_size: int | None = None) -> None:
        super().__init__()
        width = config.intermediate_size if intermediate_size is None else intermediate_size
        self.gate_proj = nn.Linear(config.hidden_size, width, bias=config.mlp_bias)
        self.up_proj = nn.Linear(config.hidden_size, width, bias=config.mlp_bias)
        self.down_proj = nn.Linear(width, config.hidden_size, bias=config.mlp_bias)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
