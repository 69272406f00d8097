"""Softmax attention (GQA, RoPE, optional q/k RMSNorm, qkv bias, sliding window) with an optional output gate.

Attention itself goes through transformers' attention interface, so ``attn_implementation`` = eager / sdpa /
flex_attention / flash_attention_* all work; the gate is applied to whatever the backend returns. Two score
variants replace or extend it: Self-Adjust Softmax (``attn_score_function``, our kernel instead of the backend) and
affine-scaled weights (``attn_affine``, applied on top of any backend).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from ..kernels.ops import sa_softmax_attention
from .affine_attention import AffineAttentionScale, mean_attended_values
from .norm import HfArchRMSNorm
from .output_gate import AttentionOutputGate
from .value_bank import ValueGate
from .rope import apply_rotary_pos_emb


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


class HfArchAttention(nn.Module):
    def __init__(self, config, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_heads = config.num_attention_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.num_key_value_groups = self.num_heads // self.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        self.sliding_window = config.sliding_window if config.layer_types[layer_idx] == "sliding_attention" else None

        hidden, bias = config.hidden_size, config.attention_bias
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden, self.num_key_value_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden, self.num_key_value_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=config.attention_output_bias)
        self.q_norm = HfArchRMSNorm(self.head_dim, eps=config.rms_norm_eps) if config.qk_norm else None
        self.k_norm = HfArchRMSNorm(self.head_dim, eps=config.rms_norm_eps) if config.qk_norm else None
        self.output_gate = AttentionOutputGate(config) if config.attn_output_gate else None
        self.score_function = config.attn_score_function
        self.affine = AffineAttentionScale(config) if config.attn_affine else None
        self.value_gate = ValueGate(config) if config.move_num_slots else None

    def project(self, hidden_states: torch.Tensor, value_bank=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q ``[B, T, H, D]``, k, v ``[B, T, H_kv, D]`` before RoPE (q/k norms applied; MoVE's bank mixed into v)."""
        hidden_shape = (*hidden_states.shape[:-1], -1, self.head_dim)
        query = self.q_proj(hidden_states).view(hidden_shape)
        key = self.k_proj(hidden_states).view(hidden_shape)
        value = self.v_proj(hidden_states).view(hidden_shape)
        if self.q_norm is not None:
            query, key = self.q_norm(query), self.k_norm(key)
        if self.value_gate is not None:
            if value_bank is None:
                raise ValueError(f"layer {self.layer_idx}: move_num_slots={self.config.move_num_slots} but no value bank "
                                 "was passed (the model holds it at model.value_bank)")
            value = value + self.value_gate(hidden_states, value_bank)
        return query, key, value

    def attend(self, query, key, value, attention_mask, past_key_values=None, **kwargs):
        """Softmax attention through the configured backend on ``[B, heads, T, D]`` tensors (RoPE applied); updates
        the cache. Returns (``[B, T, H, D]`` output, weights or None)."""
        if past_key_values is not None:
            key, value = past_key_values.update(key, value, self.layer_idx)
        implementation = self.config._attn_implementation
        attention_fn = (
            eager_attention_forward
            if implementation in (None, "eager")
            else ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention_forward)
        )
        return attention_fn(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=self.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
            sliding_window=self.sliding_window,
            **kwargs,
        )

    def finish(self, hidden_states: torch.Tensor, attn_output: torch.Tensor) -> torch.Tensor:
        """``[B, T, H, D]`` attention output → gate (if any) → o_proj."""
        attn_output = attn_output.reshape(*hidden_states.shape[:-1], -1).contiguous()
        if self.output_gate is not None:
            attn_output = self.output_gate(hidden_states, attn_output)
        return self.o_proj(attn_output)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        past_key_values=None,
        cu_seqlens=None,  # for linear mixers; attention finds packing in position_ids / its own kwargs
        position_in_sequence=None,
        padding_mask: torch.Tensor | None = None,
        value_bank=None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``padding_mask``: the 2-D ``[B, past + T]`` mask (1 = token), passed when the config's score variants
        need it; ``value_bank``: the model's MoVE bank."""
        query, key, value = self.project(hidden_states, value_bank)
        query, key = apply_rotary_pos_emb(query.transpose(1, 2), key.transpose(1, 2), *position_embeddings)
        value = value.transpose(1, 2)
        if self.score_function != "softmax":
            attn_output, attn_weights = self.attend_sa_softmax(query, key, value, padding_mask, past_key_values), None
        else:
            attn_output, attn_weights = self.attend(query, key, value, attention_mask, past_key_values, **kwargs)
        if self.affine is not None:
            values = past_key_values.layers[self.layer_idx].values if past_key_values is not None else value
            mean = mean_attended_values(values, hidden_states.shape[1], padding_mask, self.num_key_value_groups)
            attn_output = self.affine(hidden_states, attn_output, mean)
        return self.finish(hidden_states, attn_output), attn_weights

    def attend_sa_softmax(self, query, key, value, padding_mask, past_key_values=None) -> torch.Tensor:
        """SA-Softmax over ``[B, heads, T, D]`` tensors (cache updated first) → ``[B, T, H, D]``."""
        if self.sliding_window is not None:
            raise ValueError(f"layer {self.layer_idx}: attn_score_function={self.score_function!r} is implemented "
                             "for full_attention layers, not sliding_attention")
        if past_key_values is not None:
            key, value = past_key_values.update(key, value, self.layer_idx)
        mode = "plain" if self.score_function == "sa_softmax" else "normalized"
        return sa_softmax_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), mode=mode,
                                    scale=self.scaling, attention_mask=padding_mask)
