"""Score functions that run in the package's own ops instead of an attention backend: Self-Adjust Softmax (plain and
normalized) and Cubit's kernel ridge regression. They read the 2-D padding mask themselves and, on a static cache,
only the slots already filled."""

from __future__ import annotations

import torch

from ..kernels.krr.naive import naive_krr_attention_weights
from ..kernels.ops import krr_attention, sa_softmax_attention
from ..kernels.sa_softmax.naive import sa_softmax_attention_weights
from .attention_backend import weighted_values
from .attention_registry import AttentionScore, register_attention_score

__all__ = ["KernelRidgeScore", "OwnOpScore", "SelfAdjustSoftmaxScore", "SelfAdjustSoftmaxNormalizedScore"]


class OwnOpScore(AttentionScore):
    """Shared by the own-op scores: cache update, static-cache trimming, and the op or its weight maps."""

    def prepare_values(self, value: torch.Tensor) -> torch.Tensor:
        """Values as they are cached (before the cache update, so decode reads what the full forward read)."""
        return value

    def op(self, q, k, v, padding_mask, layer):
        raise NotImplementedError

    def weight_maps(self, q, k, padding_mask, layer):
        raise NotImplementedError

    def attend(self, layer, hidden_states, query, key, value, *, attention_mask=None, position_embeddings=None,
               past_key_values=None, padding_mask=None, output_attentions=False, **kwargs):
        if layer.sliding_window is not None:
            raise ValueError(f"layer {self.layer_idx}: attn_score_function={self.config.attn_score_function!r} is "
                             "implemented for full_attention layers, not sliding_attention")
        value = self.prepare_values(value)
        if past_key_values is not None:
            filled = layer.filled_length(past_key_values, key.shape[2], padding_mask)
            key, value = past_key_values.update(key, value, self.layer_idx)
            if filled is not None:
                key, value = key[:, :, :filled], value[:, :, :filled]
        q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
        if output_attentions:  # the output is computed from the returned maps, so gradients reach them
            weights = self.weight_maps(q, k, padding_mask, layer)
            return weighted_values(weights, value), value, weights
        return self.op(q, k, v, padding_mask, layer), value, None


@register_attention_score("sa_softmax")
class SelfAdjustSoftmaxScore(OwnOpScore):
    mode = "plain"

    def op(self, q, k, v, padding_mask, layer):
        return sa_softmax_attention(q, k, v, mode=self.mode, scale=layer.scaling, attention_mask=padding_mask)

    def weight_maps(self, q, k, padding_mask, layer):
        return sa_softmax_attention_weights(q, k, mode=self.mode, scale=layer.scaling, attention_mask=padding_mask)


@register_attention_score("sa_softmax_normalized")
class SelfAdjustSoftmaxNormalizedScore(SelfAdjustSoftmaxScore):
    mode = "normalized"


@register_attention_score("krr")
class KernelRidgeScore(OwnOpScore):
    def __init__(self, config, layer_idx: int) -> None:
        super().__init__(config, layer_idx)
        self.options = dict(ridge=config.krr_ridge, temperature=config.krr_temperature)
        self.value_range = config.krr_value_range

    def prepare_values(self, value):
        if self.value_range is None:
            return value
        return self.value_range * torch.tanh(value / self.value_range)  # Limited-Range Rescale

    def op(self, q, k, v, padding_mask, layer):
        return krr_attention(q, k, v, attention_mask=padding_mask, **self.options)

    def weight_maps(self, q, k, padding_mask, layer):
        return naive_krr_attention_weights(q, k, attention_mask=padding_mask, **self.options)
