"""Affine-scaled attention: ``o = (α(x)·softmax(QKᵀ/√d) + β(x)) V`` without the sum-to-one constraint.

Per head and query, ``α = 1 + x·w_α`` and ``β = x·w_β`` from the layer's normed input. Because the weights of the
``β`` term are uniform, ``β·Σ_s V_s`` needs no second attention pass: it is the running sum of the values. We divide
it by the number of attended keys (``β`` scales the mean value), so the term does not grow with the position; the
paper's schematic leaves this normalisation open. With ``w_α = w_β = 0`` the layer is plain attention, which makes
the insertion into a pretrained model exact.
"""

from __future__ import annotations

import torch
from torch import nn

from .attention_registry import AttentionFeature, register_attention_feature

__all__ = ["AffineAttentionScale", "mean_attended_values"]


@register_attention_feature("affine")
class AffineAttentionScale(AttentionFeature):
    new_parameters = ("*",)  # read by peft_utils

    def __init__(self, config, layer_idx: int | None = None) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        sliding = layer_idx is not None and config.layer_types[layer_idx] == "sliding_attention"
        self.window = config.sliding_window if sliding else None  # the keys a query attends, for the value mean
        self.weight = nn.Parameter(torch.empty(2 * self.num_heads, config.hidden_size))  # rows: α heads, β heads
        self._init = config.attn_affine_init
        self._std = config.initializer_range

    def init_parameters(self, init=nn.init) -> None:
        """``init``: transformers' ``initialization`` module (from ``_init_weights``) or ``torch.nn.init``."""
        if self._init == "identity":
            init.zeros_(self.weight)
        else:
            init.normal_(self.weight, mean=0.0, std=self._std)

    def forward(self, hidden_states: torch.Tensor, attn_output: torch.Tensor, mean_values: torch.Tensor) -> torch.Tensor:
        """hidden_states ``[B, T, hidden]``, attn_output / mean_values ``[B, T, H, D]`` → ``[B, T, H, D]``."""
        coefficients = nn.functional.linear(hidden_states, self.weight.to(hidden_states.dtype))
        alpha, beta = coefficients.to(attn_output.dtype).split(self.num_heads, dim=-1)
        return (1.0 + alpha).unsqueeze(-1) * attn_output + beta.unsqueeze(-1) * mean_values.to(attn_output.dtype)


    def adjust_output(self, hidden_states, attn_output, values_seen=None, padding_mask=None) -> torch.Tensor:
        mean = mean_attended_values(values_seen, hidden_states.shape[1], padding_mask, self.num_key_value_groups,
                                    window=self.window)
        return self(hidden_states, attn_output, mean)


def mean_attended_values(values: torch.Tensor, num_queries: int, key_mask: torch.Tensor | None,
                         groups: int, window: int | None = None) -> torch.Tensor:
    """Mean of the values each of the last ``num_queries`` positions attends causally (its last ``window`` keys,
    itself included, on a sliding-window layer).

    values ``[B, H_kv, S, D]``: what the layer attends this step (the cache included; a sliding cache hands back only
    its window), key_mask ``[B, ≥S]`` (1 = real token; its last S columns belong to ``values``) or None →
    ``[B, T, H, D]``. Padded keys are left out; a query with no real key gets 0."""
    B, H_kv, S, D = values.shape
    v = values.float()
    if key_mask is not None:
        keep = key_mask[:, None, -S:, None].to(v.dtype)
        v = v * keep
    else:
        keep = v.new_ones(1, 1, S, 1)
    # Prefix sums with a leading zero: the sum over keys (lo, hi] is sums[hi] - sums[lo].
    sums = nn.functional.pad(v.cumsum(dim=2), (0, 0, 1, 0))
    counts = nn.functional.pad(keep.cumsum(dim=2), (0, 0, 1, 0))
    hi = torch.arange(S - num_queries + 1, S + 1, device=values.device)
    lo = (hi - window).clamp(min=0) if window is not None else torch.zeros_like(hi)
    running = (sums[:, :, hi] - sums[:, :, lo]) / (counts[:, :, hi] - counts[:, :, lo]).clamp(min=1)
    running = running.repeat_interleave(groups, dim=1) if groups > 1 else running  # [B, H, T, D]
    return running.transpose(1, 2).to(values.dtype)
