"""Tensor helpers every softmax-attention path shares: GQA head repetition, the eager reference backend, and weight
maps times values."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["eager_attention_forward", "repeat_kv", "weighted_values"]


def repeat_kv(hidden_states: torch.Tensor, n_rep: int) -> torch.Tensor:
    """[B, H_kv, T, D] → [B, H_kv·n_rep, T, D]."""
    if n_rep == 1:
        return hidden_states
    b, h, t, d = hidden_states.shape
    return hidden_states[:, :, None].expand(b, h, n_rep, t, d).reshape(b, h * n_rep, t, d)


def eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Reference attention: returns ([B, T, H, D] output, [B, H, T, S] probabilities)."""
    key = repeat_kv(key, module.num_key_value_groups)
    value = repeat_kv(value, module.num_key_value_groups)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask[:, :, :, : key.shape[-2]]
    probs = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = nn.functional.dropout(probs, p=dropout, training=module.training)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), probs


def weighted_values(weights: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``[B, H, T, S]`` maps times ``[B, H_kv, S, D]`` values (kv heads repeated) → ``[B, T, H, D]``."""
    value = repeat_kv(value, weights.shape[1] // value.shape[1])
    return torch.matmul(weights, value.to(weights.dtype)).transpose(1, 2).to(value.dtype)
