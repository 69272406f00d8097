"""Softmax attention (GQA, RoPE, optional q/k RMSNorm, qkv bias, sliding window) built from registered parts.

Attention itself goes through transformers' attention interface, so ``attn_implementation`` = eager / sdpa /
flex_attention / flash_attention_* all work. The layer is projections → features' value hooks → head placement →
one ``attend`` → features' output hooks → ``o_proj`` (``attention_registry``); which parts it gets comes from the
config: the score function (``attn_score_function``: backend softmax, Self-Adjust Softmax, Cubit's KRR) and the
features switched on (MoVE's value bank, Simulated Attention Score, Grouped Differential Attention, affine scaling,
the output gate), each a registered class in its own module.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from ..kernels.lasp2 import active_plan
from ..configuration import (
    ATTENTION_LAYER_TYPES,
    TOKEN_MIXER_SPECS,
    attention_features_on,
    attention_needs_padding_mask,
)
# The built-in scores and features, imported for their registration (``attention_registry``).
from .affine_attention import AffineAttentionScale  # noqa: F401
from .differential_attention import DifferentialNoise  # noqa: F401
from .output_gate import AttentionOutputGate  # noqa: F401
from .own_op_scores import KernelRidgeScore, SelfAdjustSoftmaxScore  # noqa: F401
from .simulated_attention import SimulatedHeads  # noqa: F401
from .softmax_score import BackendSoftmaxScore  # noqa: F401
from .value_bank import ValueGate  # noqa: F401
from .attention_backend import eager_attention_forward, repeat_kv, weighted_values
from .attention_registry import ATTENTION_FEATURES, attention_feature_class, attention_score_class
from .auxiliary import merge_auxiliary, mixer_result, split_mixer_result
from .mixer_registry import register_token_mixer
from .norm import build_qk_norms
from .rope import apply_rotary_pos_emb
from .sequence_parallel_attention import sequence_parallel_attention

__all__ = ["HfArchAttention", "eager_attention_forward", "repeat_kv", "weighted_values"]


@register_token_mixer("attention")
class HfArchAttention(nn.Module):
    # Read by peft_utils (names relative to this module): the Llama projections LoRA adapts. The features' modules
    # (output_gate, differential, …) declare their own.
    lora_targets = ("q_proj", "k_proj", "v_proj", "o_proj")
    layer_types = ATTENTION_LAYER_TYPES
    attention_features = "all"  # every registered score and feature (configuration.TokenMixerSpec)
    attention_backends = None  # any of transformers' (flash / flex refused per feature: attention_kernel_conflicts)
    supports_sequence_parallel = True  # LASP-2H (plain softmax layers; features are refused at the forward)

    def __init__(self, config, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_heads = config.num_attention_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.num_key_value_groups = self.num_heads // self.num_key_value_heads
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        self.sliding_window = config.sliding_window if config.layer_types[layer_idx] == "sliding_attention" else None

        hidden, bias = config.hidden_size, config.attention_bias
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden, self.num_key_value_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden, self.num_key_value_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=config.attention_output_bias)
        self.q_norm, self.k_norm = build_qk_norms(config, self.num_heads, self.num_key_value_heads, self.head_dim)
        self.build_features(config, layer_idx)

    def build_features(self, config, layer_idx: int) -> None:
        """The score function and the features the config switches on (as attributes named by their specs, so
        parameters keep their checkpoint names; a feature that is off is None)."""
        for cls in ATTENTION_FEATURES.values():
            setattr(self, cls.spec.attribute, None)
        spec = TOKEN_MIXER_SPECS[self.mixer_name]
        built = [(name, feature) for name, feature in attention_features_on(config) if spec.builds_feature(name)]
        self.feature_attributes = tuple(feature.attribute for _, feature in built)
        for name, feature in built:
            setattr(self, feature.attribute, attention_feature_class(name)(config, layer_idx))
        self.score = attention_score_class(config.attn_score_function if spec.builds_feature("score_function")
                                           else "softmax")(config, layer_idx)
        self.scaling = config.softmax_scale(self.head_dim)
        for feature in self.features:
            self.scaling = feature.scaling(self.scaling)
        # Names, not the modules: a second attribute holding a module would register its parameters twice.
        self.head_placer_attribute = self._single("places_heads")
        self.attender_attribute = self._single("attends")

    @property
    def features(self) -> list[nn.Module]:
        return [getattr(self, attribute) for attribute in self.feature_attributes]

    @property
    def head_placer(self):
        """The feature that places heads and applies positions itself (SAS), or None: RoPE on the layer's heads."""
        return None if self.head_placer_attribute is None else getattr(self, self.head_placer_attribute)

    @property
    def attender(self):
        """What computes attention: a feature that replaces the score (GDA), else the score function."""
        return self.score if self.attender_attribute is None else getattr(self, self.attender_attribute)

    def _single(self, role: str) -> str | None:
        owners = [attribute for attribute in self.feature_attributes if getattr(getattr(self, attribute), role)]
        if len(owners) > 1:
            raise ValueError(f"layer {self.layer_idx}: features {owners} each {role.replace('_', ' ')}; a layer takes "
                             "one")
        return owners[0] if owners else None

    def project(self, hidden_states: torch.Tensor, value_bank=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q ``[B, T, H, D]``, k, v ``[B, T, H_kv, D]`` before RoPE (q/k norms applied, features' value hooks run)."""
        hidden_shape = (*hidden_states.shape[:-1], -1, self.head_dim)
        query = self.q_proj(hidden_states).view(hidden_shape)
        key = self.k_proj(hidden_states).view(hidden_shape)
        value = self.v_proj(hidden_states).view(hidden_shape)
        if self.q_norm is not None:
            query, key = self.q_norm(query), self.k_norm(key)
        for feature in self.features:
            value = feature.adjust_values(hidden_states, value, value_bank)
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

    def finish(self, hidden_states: torch.Tensor, attn_output: torch.Tensor, values_seen=None,
               padding_mask=None) -> torch.Tensor:
        """``[B, T, heads, D]`` attention output → features' output hooks (head aggregation, affine, gate) →
        o_proj."""
        for feature in self.features:
            attn_output = feature.adjust_output(hidden_states, attn_output, values_seen, padding_mask)
        return self.o_proj(attn_output.reshape(*hidden_states.shape[:-1], -1).contiguous())

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
        """``padding_mask``: the 2-D ``[B, past + T]`` mask (1 = token), passed when the config's scores or features
        need it; ``value_bank``: the model's MoVE bank. The training modes of linear / sparse layers
        (``attention_transfer``, ``sparse_attention_mode``) leave plain attention as it is (and out of the backend's
        arguments)."""
        if cu_seqlens is not None and past_key_values is None and attention_needs_padding_mask(self.config):
            return self.forward_per_sequence(hidden_states, position_embeddings, attention_mask, cu_seqlens,
                                             output_attentions=output_attentions, value_bank=value_bank, **kwargs)
        query, key, value = self.project(hidden_states, value_bank)
        if self.head_placer is not None:
            query, key, value = self.head_placer.place_heads(query, key, value, position_embeddings)
        else:
            query, key = apply_rotary_pos_emb(query.transpose(1, 2), key.transpose(1, 2), *position_embeddings)
            value = value.transpose(1, 2)
        plan = active_plan()
        if plan is not None:  # LASP-2H: this rank's queries against the keys of every chunk up to its own
            if past_key_values is not None:
                raise ValueError(f"layer {self.layer_idx}: sequence parallelism runs without a cache (use_cache=False)")
            return self.finish(hidden_states, sequence_parallel_attention(self, query, key, value, plan)), None
        attn_output, values_seen, attn_weights = self.attender.attend(
            self, hidden_states, query, key, value, attention_mask=attention_mask,
            position_embeddings=position_embeddings, past_key_values=past_key_values, padding_mask=padding_mask,
            output_attentions=output_attentions, **kwargs)
        return self.finish(hidden_states, attn_output, values_seen, padding_mask), attn_weights

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
