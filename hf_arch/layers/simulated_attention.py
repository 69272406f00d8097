"""Simulated Attention Score (SAS): attention over more, wider heads simulated from the real ones.

The real projections give ``H`` query heads and ``H_kv`` key/value heads of width ``D``. Small learned maps mix them
into ``H' = sas_num_heads`` query heads and ``H_kv·H'/H`` key/value heads (head mixing, which commutes with RoPE),
and widen each query/key from ``D`` to ``D' = sas_qk_dim`` features (RoPE then rotates the first ``D`` features, a
partial rotary embedding). Attention runs over the simulated heads through the configured backend, and
Parameter-Efficient Attention Aggregation (PEAA) mixes the ``H'`` outputs back into ``H`` heads with one ``[H', H]``
map, so ``o_proj`` keeps its shape. Added parameters: ``H·H' + 2·H_kv·H_kv' + 2·D·D' + H'·H`` per layer, against
``(H' − H)·D·hidden·4`` for real extra heads.
"""

from __future__ import annotations

import torch
from torch import nn

from .attention_registry import AttentionFeature, register_attention_feature
from .rope import apply_rotary_pos_emb

__all__ = ["SimulatedHeads"]


@register_attention_feature("simulated_heads")
class SimulatedHeads(AttentionFeature):
    new_parameters = ("*",)  # read by peft_utils
    places_heads = True

    def __init__(self, config, layer_idx: int | None = None) -> None:
        super().__init__()
        heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
        ratio = config.sas_num_heads // heads
        self.head_dim, self.qk_dim = config.head_dim, config.sas_qk_dim
        self.query_heads = nn.Parameter(torch.empty(heads, heads * ratio))
        self.key_heads = nn.Parameter(torch.empty(kv_heads, kv_heads * ratio))
        self.value_heads = nn.Parameter(torch.empty(kv_heads, kv_heads * ratio))
        self.query_features = nn.Parameter(torch.empty(self.head_dim, self.qk_dim))
        self.key_features = nn.Parameter(torch.empty(self.head_dim, self.qk_dim))
        self.aggregate = nn.Parameter(torch.empty(heads * ratio, heads))

    def init_parameters(self, init=nn.init) -> None:
        """Variance-preserving random maps (fan-in scaled), so simulated heads start distinct rather than copies."""
        for weight in (self.query_heads, self.key_heads, self.value_heads, self.query_features, self.key_features,
                       self.aggregate):
            init.normal_(weight, mean=0.0, std=weight.shape[0] ** -0.5)

    def _widen(self, states: torch.Tensor, heads: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        mixed = torch.einsum("bthd,hg->btgd", states, heads.to(states.dtype))
        return (mixed @ features.to(states.dtype)).transpose(1, 2)  # [B, H', T, D']

    def queries_and_keys(self, query: torch.Tensor, key: torch.Tensor, position_embeddings) -> tuple[torch.Tensor,
                                                                                                      torch.Tensor]:
        """query ``[B, T, H, D]``, key ``[B, T, H_kv, D]`` (before RoPE) → ``[B, H', T, D']``, ``[B, H_kv', T, D']``."""
        query = self._widen(query, self.query_heads, self.query_features)
        key = self._widen(key, self.key_heads, self.key_features)
        d = self.head_dim
        rotated_q, rotated_k = apply_rotary_pos_emb(query[..., :d], key[..., :d], *position_embeddings)
        return torch.cat([rotated_q, query[..., d:]], dim=-1), torch.cat([rotated_k, key[..., d:]], dim=-1)

    def values(self, value: torch.Tensor) -> torch.Tensor:
        """``[B, T, H_kv, D]`` → ``[B, H_kv', T, D]``."""
        return torch.einsum("bthd,hg->bgtd", value, self.value_heads.to(value.dtype))

    def aggregate_heads(self, attn_output: torch.Tensor) -> torch.Tensor:
        """PEAA: ``[B, T, H', D]`` → ``[B, T, H, D]``."""
        return torch.einsum("btgd,gh->bthd", attn_output, self.aggregate.to(attn_output.dtype))

    def scaling(self, default: float) -> float:
        return self.qk_dim**-0.5  # the simulated queries and keys are D' wide

    def place_heads(self, query, key, value, position_embeddings):
        query, key = self.queries_and_keys(query, key, position_embeddings)
        return query, key, self.values(value)

    def adjust_output(self, hidden_states, attn_output, values_seen=None, padding_mask=None) -> torch.Tensor:
        return self.aggregate_heads(attn_output)
