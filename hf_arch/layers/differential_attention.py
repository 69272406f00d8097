"""Grouped Differential Attention: signal attention minus λ times a noise map, with fewer noise heads than signal heads.

Differential attention (DIFF Transformer) computes two softmax maps per head and subtracts the second, scaled by a
learned λ, to cancel attention noise; a per-head RMSNorm and a ``(1 − λ_init)`` factor follow
(``diff_attn_head_norm``; without them the output is the plain difference). GDA makes the two
groups unequal: the ``num_attention_heads`` signal heads keep the layer's ``q/k/v`` projections, while
``diff_attn_noise_heads`` noise heads have their own small ``q/k`` projections and each noise map is shared by a group
of signal heads (GQA-style "controlled repetition"), so only ``diff_attn_noise_heads`` noise maps are computed. Each
signal head's noise term reuses its own values. We learn λ directly per signal head (DIFF reparameterises it through
four vectors; the paper's GDA abstract leaves this open).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .attention_registry import AttentionFeature, register_attention_feature
from .noise_key_cache import attach_noise_key_layers
from .norm import HfArchRMSNorm
from .rope import apply_rotary_pos_emb

__all__ = ["DifferentialNoise", "default_lambda_init", "group_values_by_noise_head"]


def default_lambda_init(layer_idx: int) -> float:
    """DIFF Transformer's depth schedule ``0.8 − 0.6·exp(−0.3·l)`` (layer index from 0)."""
    return 0.8 - 0.6 * math.exp(-0.3 * layer_idx)


@register_attention_feature("differential")
class DifferentialNoise(AttentionFeature):
    """The noise branch of one layer: ``noise_q_proj``/``noise_k_proj`` (``H_n`` heads), ``λ [H]`` and the head norm."""

    lora_targets = ("noise_q_proj", "noise_k_proj")  # read by peft_utils
    new_parameters = ("*",)
    attends = True

    def __init__(self, config, layer_idx: int) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_noise_heads = config.diff_attn_noise_heads
        self.head_dim = config.head_dim
        self.lambda_init = (config.diff_attn_lambda_init if config.diff_attn_lambda_init is not None
                            else default_lambda_init(layer_idx))
        width, bias = self.num_noise_heads * self.head_dim, config.attention_bias
        self.noise_q_proj = nn.Linear(config.hidden_size, width, bias=bias)
        self.noise_k_proj = nn.Linear(config.hidden_size, width, bias=bias)
        self.noise_lambda = nn.Parameter(torch.empty(self.num_heads))
        self.head_norm = HfArchRMSNorm(self.head_dim, eps=config.rms_norm_eps) if config.diff_attn_head_norm else None
        # What transformers' attention backends read from the module they are handed: the noise call passes this
        # one (H_n query heads over H_n key heads, no further grouping).
        self.config = config
        self.layer_idx = layer_idx
        self.num_key_value_groups = 1
        self.is_causal = True

    def init_parameters(self, init=nn.init) -> None:
        init.constant_(self.noise_lambda, self.lambda_init)

    def project(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Noise queries and keys ``[B, T, H_n, D]`` (before RoPE)."""
        shape = (*hidden_states.shape[:-1], self.num_noise_heads, self.head_dim)
        return self.noise_q_proj(hidden_states).view(shape), self.noise_k_proj(hidden_states).view(shape)

    def attend(self, layer, hidden_states, query, key, value, *, attention_mask=None, position_embeddings=None,
               past_key_values=None, padding_mask=None, output_attentions=False, **kwargs):
        """Signal attention minus the noise maps on ``[B, heads, T, D]`` tensors → (``[B, T, H, D]``, the values
        attended, signal weights). The noise keys live in a companion of the layer's cache entry
        (``noise_key_cache``), so the entry itself keeps transformers' key/value shapes and any cache kind (dynamic,
        sliding, static) works."""
        noise_query, noise_key = self.project(hidden_states)
        if layer.q_norm is not None:
            noise_query, noise_key = layer.q_norm(noise_query), layer.k_norm(noise_key)
        noise_query, noise_key = apply_rotary_pos_emb(noise_query.transpose(1, 2), noise_key.transpose(1, 2),
                                                      *position_embeddings)
        if past_key_values is not None:
            attach_noise_key_layers(past_key_values, (self.layer_idx,))
            key, value = past_key_values.update(key, value, self.layer_idx)
            noise_key = past_key_values.layers[self.layer_idx].update_noise_keys(noise_key)
        signal, weights = layer.attend(query, key, value, attention_mask, **kwargs)
        grouped = group_values_by_noise_head(value, self.num_heads, self.num_noise_heads)
        # One map per noise head: the backend sees H_n query heads and H_n key heads (no further grouping).
        noise_out, _ = layer.attend(noise_query, noise_key, grouped, attention_mask, module=self, **kwargs)
        return self.combine(signal, noise_out.reshape(*signal.shape)), value, weights

    def combine(self, signal: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """signal, noise ``[B, T, H, D]`` → ``(1 − λ_init) · RMSNorm(signal − λ_h · noise)`` (or the plain
        difference without the head norm)."""
        diff = signal - self.noise_lambda.to(signal.dtype)[:, None] * noise
        if self.head_norm is None:
            return diff
        return self.head_norm(diff) * (1.0 - self.lambda_init)


def group_values_by_noise_head(values: torch.Tensor, num_heads: int, num_noise_heads: int) -> torch.Tensor:
    """values ``[B, H_kv, S, D]`` → ``[B, H_n, S, (H/H_n)·D]``: for each noise head, the values of its signal heads
    side by side, so one attention call per noise map yields the noise term of every signal head in its group (the
    output reshapes to ``[B, T, H, D]`` in signal-head order)."""
    B, H_kv, S, D = values.shape
    per_signal = values.repeat_interleave(num_heads // H_kv, dim=1)  # [B, H, S, D]: signal head h uses kv h // (H/H_kv)
    group = num_heads // num_noise_heads
    return per_signal.view(B, num_noise_heads, group, S, D).permute(0, 1, 3, 2, 4).reshape(B, num_noise_heads, S,
                                                                                           group * D)
