"""MoVE: a global bank of learned value embeddings shared by every attention layer.

Each attention layer mixes bank entries into its values, ``v' = W_v x + s(x) · Σ_j softmax(x W_r)_j e_j``: a soft
router picks slots, and a per-kv-head scale ``s(x) = x·w_s`` sets how much of the mix enters. The bank's memory
grows with the slot count, not with depth or FLOPs. With ``w_s = 0`` (``move_init="identity"``) every layer is
plain attention, so the bank inserts exactly into a pretrained checkpoint and training opens it.
"""

from __future__ import annotations

import torch
from torch import nn

from .attention_registry import AttentionFeature, register_attention_feature

__all__ = ["ValueBank", "ValueGate"]


class ValueBank(nn.Module):
    """``weight [slots, H_kv·D]``: one value embedding per slot, stored once on the model."""

    new_parameters = ("*",)  # read by peft_utils

    def __init__(self, config) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(config.move_num_slots, config.num_key_value_heads * config.head_dim))
        self._std = config.initializer_range

    def init_parameters(self, init=nn.init) -> None:
        init.normal_(self.weight, mean=0.0, std=self._std)


@register_attention_feature("value_bank")
class ValueGate(AttentionFeature):
    """Per layer: the slot router ``W_r [slots, hidden]`` and the per-kv-head scale ``w_s [H_kv, hidden]``."""

    new_parameters = ("*",)

    def __init__(self, config, layer_idx: int | None = None) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_key_value_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.router = nn.Parameter(torch.empty(config.move_num_slots, config.hidden_size))
        self.scale = nn.Parameter(torch.empty(config.num_key_value_heads, config.hidden_size))
        self._init = config.move_init
        self._std = config.initializer_range

    def init_parameters(self, init=nn.init) -> None:
        init.normal_(self.router, mean=0.0, std=self._std)
        if self._init == "identity":
            init.zeros_(self.scale)
        else:
            init.normal_(self.scale, mean=0.0, std=self._std)

    def forward(self, hidden_states: torch.Tensor, bank: ValueBank) -> torch.Tensor:
        """hidden_states ``[B, T, hidden]`` → the value increment ``[B, T, H_kv, D]``."""
        weights = torch.softmax(nn.functional.linear(hidden_states.float(), self.router.float()), dim=-1)
        mix = (weights @ bank.weight.float()).view(*hidden_states.shape[:-1], self.num_key_value_heads, self.head_dim)
        scale = nn.functional.linear(hidden_states, self.scale.to(hidden_states.dtype))
        return (scale.unsqueeze(-1).float() * mix).to(hidden_states.dtype)

    def adjust_values(self, hidden_states: torch.Tensor, value: torch.Tensor, value_bank=None) -> torch.Tensor:
        if value_bank is None:
            raise ValueError(f"layer {self.layer_idx}: move_num_slots={self.router.shape[0]} but no value bank was "
                             "passed (the model holds it at model.value_bank)")
        return value + self(hidden_states, value_bank)
