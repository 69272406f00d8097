"""Softmax attention under sequence parallelism (LASP-2H, arXiv 2502.07563 §3.4): each rank holds a contiguous chunk
of the sequence; one all-gather of the keys and values gives every rank the keys up to the end of its chunk, and its
queries attend to them causally at their global positions (and within the layer's sliding window, if it has one).

The keys' gradients flow back to the ranks that own them (``all_gather_with_grad``). Only plain softmax layers:
score functions and features that read positions or keys themselves are refused by name.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..kernels.lasp2 import SequenceParallelPlan, all_gather_with_grad
from .attention_backend import repeat_kv
from .softmax_score import BackendSoftmaxScore

__all__ = ["sequence_parallel_attention", "check_sequence_parallel_attention"]


def check_sequence_parallel_attention(layer) -> None:
    if layer.feature_attributes or not isinstance(layer.attender, BackendSoftmaxScore) or layer.head_placer is not None:
        parts = list(layer.feature_attributes) or [type(layer.attender).__name__]
        raise NotImplementedError(f"layer {layer.layer_idx}: sequence parallelism supports plain softmax attention "
                                  f"layers; this one has {', '.join(parts)}")


def sequence_parallel_attention(layer, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                plan: SequenceParallelPlan) -> torch.Tensor:
    """query ``[B, H, T, D]``, key / value ``[B, H_kv, T, D]`` of this rank's chunk (RoPE at global positions applied)
    -> ``[B, T, H, D]``."""
    check_sequence_parallel_attention(layer)
    B, _, T, D = key.shape
    rank = plan.rank
    keys = all_gather_with_grad(key, plan)[: rank + 1]  # [r + 1, B, H_kv, T, D]: the chunks up to this one
    values = all_gather_with_grad(value, plan)[: rank + 1]
    keys = keys.permute(1, 2, 0, 3, 4).reshape(B, -1, (rank + 1) * T, D)
    values = values.permute(1, 2, 0, 3, 4).reshape(B, -1, (rank + 1) * T, values.shape[-1])
    groups = layer.num_key_value_groups
    keys, values = repeat_kv(keys, groups), repeat_kv(values, groups)
    q_pos = rank * T + torch.arange(T, device=query.device)
    k_pos = torch.arange((rank + 1) * T, device=query.device)
    visible = k_pos[None, :] <= q_pos[:, None]
    if layer.sliding_window is not None:
        visible &= k_pos[None, :] > q_pos[:, None] - layer.sliding_window
    dropout = layer.attention_dropout if layer.training else 0.0
    out = F.scaled_dot_product_attention(query, keys.to(query.dtype), values.to(query.dtype), attn_mask=visible,
                                         dropout_p=dropout, scale=layer.scaling)
    return out.transpose(1, 2)
