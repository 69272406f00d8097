"""Softmax attention (GQA, RoPE, optional q/k RMSNorm, qkv bias, sliding window) with an optional output gate.

Attention itself goes through transformers' attention interface, so ``attn_implementation`` = eager / sdpa /
flex_attention / flash_attention_* all work; the gate is applied to whatever the backend returns. Score and head
variants replace or extend it (each in its own module under ``layers/``):

- ``attn_score_function``: Self-Adjust Softmax or Cubit's kernel ridge regression, our ops instead of the backend;
- ``attn_affine``: affine-scaled weights on top of any backend;
- ``diff_attn_noise_heads``: Grouped Differential Attention (a second, shared noise map subtracted);
- ``sas_num_heads``: Simulated Attention Score (attention over more, wider simulated heads, aggregated back);
- ``move_num_slots``: MoVE's shared value bank mixed into the values.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from ..configuration import ATTENTION_LAYER_TYPES, ATTENTION_ONLY_SWITCHES
from ..kernels.krr.naive import naive_krr_attention_weights
from ..kernels.ops import krr_attention, sa_softmax_attention
from ..kernels.sa_softmax.naive import sa_softmax_attention_weights
from .affine_attention import AffineAttentionScale, mean_attended_values
from .auxiliary import merge_auxiliary, mixer_result, split_mixer_result
from .differential_attention import DifferentialNoise, group_values_by_noise_head
from .mixer_registry import register_token_mixer
from .noise_key_cache import attach_noise_key_layers
from .norm import HfArchRMSNorm
from .output_gate import AttentionOutputGate
from .rope import apply_rotary_pos_emb
from .simulated_attention import SimulatedHeads
from .value_bank import ValueGate


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


@register_token_mixer("attention")
class HfArchAttention(nn.Module):
    # Read by peft_utils (names relative to this module): the Llama projections LoRA adapts. The score and
    # head variants' modules (output_gate, differential, …) declare their own.
    lora_targets = ("q_proj", "k_proj", "v_proj", "o_proj")
    layer_types = ATTENTION_LAYER_TYPES
    config_fields = ATTENTION_ONLY_SWITCHES  # its score, head and value variants (flat fields of HfArchConfig)
    attention_backends = None  # any of transformers' (flash / flex refused per feature: attention_kernel_conflicts)

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
        self.differential = DifferentialNoise(config, layer_idx) if config.diff_attn_noise_heads else None
        self.simulated = SimulatedHeads(config) if config.sas_num_heads else None
        if self.simulated is not None:
            self.scaling = config.sas_qk_dim**-0.5

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

    def attend(self, query, key, value, attention_mask, past_key_values=None, module=None, **kwargs):
        """Softmax attention through the configured backend on ``[B, heads, T, D]`` tensors (RoPE applied); updates
        the cache. ``module``: what the backend reads head grouping from (default this layer). Returns
        (``[B, T, heads, D_v]`` output, weights or None)."""
        if past_key_values is not None:
            key, value = past_key_values.update(key, value, self.layer_idx)
        implementation = self.config._attn_implementation
        attention_fn = (
            eager_attention_forward
            if implementation in (None, "eager")
            else ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention_forward)
        )
        return attention_fn(
            self if module is None else module,
            query,
            key,
            value,
            attention_mask,
            dropout=self.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
            sliding_window=self.sliding_window,
            **kwargs,
        )

    def filled_length(self, past_key_values, num_new: int, padding_mask=None) -> int | None:
        """How many of the positions the cache will hand back are real, where that can be fewer than it returns (a
        static cache returns all its slots); None when every returned position is real. The mixers that read keys or
        values themselves (score ops, affine value means) must not see the empty slots; the backends mask them."""
        layer = past_key_values.layers[self.layer_idx]
        if getattr(layer, "max_cache_len", None) is None or self.sliding_window is not None:
            return None
        if padding_mask is not None:
            return padding_mask.shape[-1]
        return int(past_key_values.get_seq_length(self.layer_idx)) + num_new

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
        output_attentions: bool = False,
        attention_transfer: bool = False,
        sparse_attention_mode: str | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``padding_mask``: the 2-D ``[B, past + T]`` mask (1 = token), passed when the config's score variants
        need it; ``value_bank``: the model's MoVE bank. The training modes of linear / sparse layers
        (``attention_transfer``, ``sparse_attention_mode``) leave plain attention as it is (and out of the backend's
        arguments)."""
        if cu_seqlens is not None and past_key_values is None and self.config.attention_needs_padding_mask:
            return self.forward_per_sequence(hidden_states, position_embeddings, attention_mask, cu_seqlens,
                                             output_attentions=output_attentions, value_bank=value_bank, **kwargs)
        query, key, value = self.project(hidden_states, value_bank)
        if self.simulated is not None:
            query, key = self.simulated.queries_and_keys(query, key, position_embeddings)
            value = self.simulated.values(value)
        else:
            query, key = apply_rotary_pos_emb(query.transpose(1, 2), key.transpose(1, 2), *position_embeddings)
            value = value.transpose(1, 2)
        if self.score_function != "softmax":
            attn_output, value, attn_weights = self.attend_by_score_op(query, key, value, padding_mask,
                                                                       past_key_values, output_attentions)
        elif self.differential is not None:
            attn_output, attn_weights = self.attend_differential(hidden_states, query, key, value, attention_mask,
                                                                 position_embeddings, past_key_values, **kwargs)
        else:
            if past_key_values is not None:  # value: what this step attends (a sliding cache returns its window)
                filled = self.filled_length(past_key_values, key.shape[2], padding_mask)
                key, value = past_key_values.update(key, value, self.layer_idx)
                value_seen = value[:, :, :filled] if filled is not None else value  # the backend masks empty slots
            else:
                value_seen = value
            attn_output, attn_weights = self.attend(query, key, value, attention_mask, **kwargs)
            value = value_seen
        if self.simulated is not None:
            attn_output = self.simulated.aggregate_heads(attn_output)
        if self.affine is not None:
            mean = mean_attended_values(value, hidden_states.shape[1], padding_mask, self.num_key_value_groups,
                                        window=self.sliding_window)
            attn_output = self.affine(hidden_states, attn_output, mean)
        return self.finish(hidden_states, attn_output), attn_weights

    def forward_per_sequence(self, hidden_states, position_embeddings, attention_mask, cu_seqlens,
                             output_attentions=False, **kwargs):
        """Packed rows (``B = 1``, sequences back to back at ``cu_seqlens``) for mixers that read positions themselves
        (score ops, affine value means, sparse block layouts and routes): run each sequence on its own, as if it
        were a row, so none sees another. The 4-D mask is cut to each sequence's block (causal there); the maps, if
        asked for, come back block-diagonal. Auxiliary outputs (a sparse layer's gate loss, routing probabilities and
        choices, block counts) are combined over the sequences (``auxiliary.merge_auxiliary``)."""
        bounds = [int(b) for b in cu_seqlens]
        T = hidden_states.shape[1]
        outputs, maps, auxiliaries = [], [], []
        for start, end in zip(bounds[:-1], bounds[1:]):
            mask = attention_mask[..., start:end, start:end] if isinstance(attention_mask, torch.Tensor) else None
            out, weights, auxiliary = split_mixer_result(self.forward(
                hidden_states[:, start:end], tuple(p[:, start:end] for p in position_embeddings), attention_mask=mask,
                output_attentions=output_attentions, **kwargs))
            outputs.append(out)
            maps.append(weights)
            auxiliaries.append(auxiliary)
        weights = None
        if output_attentions and all(m is not None for m in maps):
            weights = maps[0].new_zeros(*maps[0].shape[:2], T, T)
            for (start, end), block in zip(zip(bounds[:-1], bounds[1:]), maps):
                weights[..., start:end, start:end] = block
        return mixer_result(torch.cat(outputs, dim=1), weights, merge_auxiliary(auxiliaries))

    def attend_by_score_op(self, query, key, value, padding_mask, past_key_values=None, output_attentions=False):
        """SA-Softmax or KRR over ``[B, heads, T, D]`` tensors (cache updated first) → (``[B, T, H, D]``, the
        ``[B, H_kv, S, D]`` values attended, the ``[B, H, T, S]`` weight maps when asked for, else None)."""
        if self.sliding_window is not None:
            raise ValueError(f"layer {self.layer_idx}: attn_score_function={self.score_function!r} is implemented "
                             "for full_attention layers, not sliding_attention")
        if self.score_function == "krr" and self.config.krr_value_range is not None:
            # Limited-Range Rescale before caching, so decode reads the same values as the full forward.
            bound = self.config.krr_value_range
            value = bound * torch.tanh(value / bound)
        if past_key_values is not None:
            filled = self.filled_length(past_key_values, key.shape[2], padding_mask)
            key, value = past_key_values.update(key, value, self.layer_idx)
            if filled is not None:
                key, value = key[:, :, :filled], value[:, :, :filled]
        q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
        if self.score_function == "krr":
            krr = dict(ridge=self.config.krr_ridge, temperature=self.config.krr_temperature, attention_mask=padding_mask)
            if output_attentions:  # the output is computed from the returned maps, so gradients reach them
                weights = naive_krr_attention_weights(q, k, **krr)
                return weighted_values(weights, value), value, weights
            return krr_attention(q, k, v, **krr), value, None
        mode = "plain" if self.score_function == "sa_softmax" else "normalized"
        options = dict(mode=mode, scale=self.scaling, attention_mask=padding_mask)
        if output_attentions:
            weights = sa_softmax_attention_weights(q, k, **options)
            return weighted_values(weights, value), value, weights
        return sa_softmax_attention(q, k, v, **options), value, None

    def attend_differential(self, hidden_states, query, key, value, attention_mask, position_embeddings,
                            past_key_values=None, **kwargs):
        """Grouped Differential Attention on ``[B, heads, T, D]`` tensors → (``[B, T, H, D]``, signal weights).

        The noise keys live in a companion of this layer's cache entry (``noise_key_cache``), so the entry itself keeps
        transformers' key/value shapes and any cache kind (dynamic, sliding, static) works."""
        noise = self.differential
        noise_query, noise_key = noise.project(hidden_states)
        if self.q_norm is not None:
            noise_query, noise_key = self.q_norm(noise_query), self.k_norm(noise_key)
        noise_query, noise_key = apply_rotary_pos_emb(noise_query.transpose(1, 2), noise_key.transpose(1, 2),
                                                      *position_embeddings)
        if past_key_values is not None:
            attach_noise_key_layers(past_key_values, (self.layer_idx,))
            key, value = past_key_values.update(key, value, self.layer_idx)
            noise_key = past_key_values.layers[self.layer_idx].update_noise_keys(noise_key)
        signal, weights = self.attend(query, key, value, attention_mask, **kwargs)
        grouped = group_values_by_noise_head(value, self.num_heads, noise.num_noise_heads)
        # One map per noise head: the backend sees H_n query heads and H_n key heads (no further grouping).
        noise_out, _ = self.attend(noise_query, noise_key, grouped, attention_mask, module=noise, **kwargs)
        noise_out = noise_out.reshape(*signal.shape)
        return noise.combine(signal, noise_out), weights
