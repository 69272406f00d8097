"""Cache layers that keep Grouped Differential Attention's noise keys beside a layer's keys and values.

GDA's noise maps need the noise keys of every past token, which are not the layer's keys. They live in a companion
layer of the same kind as the layer itself (dynamic, sliding, static), so they grow, slide, crop, reorder and
preallocate exactly as the keys do; the layer's own ``keys`` / ``values`` keep transformers' standard
``[batch, num_key_value_heads, seq, head_dim]`` shape, which the cache-format checks, ``StaticCache``, beam search and
cache cropping rely on. The companion stores zero-width values, so it costs the noise keys only.
"""

from __future__ import annotations

import torch

from .cache_extensions import extend_layer, extended_layer_classes

__all__ = ["NoiseKeyLayerMixin", "attach_noise_key_layers"]


class NoiseKeyLayerMixin:
    """Mixed in before a transformers cache layer class: ``self.noise_keys`` is an empty layer of the same kind."""

    noise_keys = None

    def start_extension(self, kind: type, settings: dict) -> None:
        self.noise_keys = kind(**settings)
        if getattr(self, "record_past", False):  # generate() armed it for rolling back drafts: the noise keys too
            self.noise_keys.activate_past_recording()

    def update_noise_keys(self, noise_keys: torch.Tensor) -> torch.Tensor:
        """Append ``[B, H_n, T, D]`` noise keys; returns what this step attends, aligned with what ``update`` returned
        for the keys (the whole past, the sliding window, or every static slot)."""
        cached, _ = self.noise_keys.update(noise_keys, noise_keys[..., :0])
        return cached

    def _both(self, method: str, *args, **kwargs) -> None:
        getattr(super(), method)(*args, **kwargs)
        getattr(self.noise_keys, method)(*args, **kwargs)

    def crop(self, tokens_to_remove: int) -> None:
        self._both("crop", tokens_to_remove)

    def reset(self) -> None:
        self._both("reset")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._both("reorder_cache", beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._both("batch_repeat_interleave", repeats)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._both("batch_select_indices", indices)

    def offload(self) -> None:
        self._both("offload")

    def prefetch(self) -> None:
        self._both("prefetch")

    def activate_past_recording(self, *args, **kwargs) -> None:
        """Sliding layers keep their evicted past once assisted decoding may roll back; so must the noise keys
        (layer kinds that keep everything have nothing to arm)."""
        if hasattr(super(), "activate_past_recording"):
            self._both("activate_past_recording", *args, **kwargs)


NOISE_KEY_LAYERS = extended_layer_classes(NoiseKeyLayerMixin)


def attach_noise_key_layers(cache, layer_indices) -> None:
    """Give the cache layers at ``layer_indices`` a noise-key companion, in place (cheap once they have one)."""
    for layer_idx in layer_indices:
        extend_layer(cache, layer_idx, NOISE_KEY_LAYERS, "Grouped Differential Attention noise keys")
