"""Cache layers that keep Grouped Differential Attention's noise keys beside a layer's keys and values.

GDA's noise maps need the noise keys of every past token, which are not the layer's keys. They live in a companion
layer of the same kind as the layer itself (dynamic, sliding, static), so they grow, slide, crop, reorder and
preallocate exactly as the keys do; the layer's own ``keys`` / ``values`` keep transformers' standard
``[batch, num_key_value_heads, seq, head_dim]`` shape, which the cache-format checks, ``StaticCache``, beam search and
cache cropping rely on. The companion stores zero-width values, so it costs the noise keys only.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer, StaticLayer, StaticSlidingWindowLayer

__all__ = ["NoiseKeyLayerMixin", "attach_noise_key_layers"]


class NoiseKeyLayerMixin:
    """Mixed in before a transformers cache layer class: ``self.noise_keys`` is an uninitialised copy of the layer."""

    noise_keys = None

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


class NoiseKeyDynamicLayer(NoiseKeyLayerMixin, DynamicLayer):
    pass


class NoiseKeyDynamicSlidingWindowLayer(NoiseKeyLayerMixin, DynamicSlidingWindowLayer):
    def activate_past_recording(self, *args, **kwargs) -> None:
        """The layer keeps its evicted past once assisted decoding may roll back; so must the noise keys."""
        self._both("activate_past_recording", *args, **kwargs)


class NoiseKeyStaticLayer(NoiseKeyLayerMixin, StaticLayer):
    pass


class NoiseKeyStaticSlidingWindowLayer(NoiseKeyLayerMixin, StaticSlidingWindowLayer):
    pass


# transformers' layer kind → (ours, its constructor's settings read from an instance). Exact types: a subclass may
# store more. A static sliding layer keeps only min(window, max_cache_len) as its max_cache_len: passing it as both
# gives the same buffer.
_NOISE_KEY_LAYERS = {
    DynamicLayer: (NoiseKeyDynamicLayer, lambda layer: {}),
    DynamicSlidingWindowLayer: (NoiseKeyDynamicSlidingWindowLayer,
                                lambda layer: {"sliding_window": layer.sliding_window}),
    StaticLayer: (NoiseKeyStaticLayer, lambda layer: {"max_cache_len": layer.max_cache_len}),
    StaticSlidingWindowLayer: (NoiseKeyStaticSlidingWindowLayer,
                               lambda layer: {"max_cache_len": layer.max_cache_len, "sliding_window": layer.max_cache_len}),
}


def attach_noise_key_layers(cache, layer_indices) -> None:
    """Give the cache layers at ``layer_indices`` a noise-key companion, in place. A layer must still be empty (a
    cache that already holds keys without noise keys cannot be continued by GDA); layers already carrying one are left
    as they are, so this is cheap to call on every forward."""
    for layer_idx in layer_indices:
        layer = cache.layers[layer_idx]
        if isinstance(layer, NoiseKeyLayerMixin):
            continue
        if getattr(layer, "is_initialized", False):
            raise ValueError(f"cache layer {layer_idx} ({type(layer).__name__}) already holds keys but no Grouped "
                             "Differential Attention noise keys: continue GDA only from a cache this model filled")
        if type(layer) not in _NOISE_KEY_LAYERS:
            raise ValueError(f"cache layer {layer_idx} is a {type(layer).__name__}, which cannot carry Grouped "
                             f"Differential Attention noise keys; use one of "
                             f"{sorted(kind.__name__ for kind in _NOISE_KEY_LAYERS)} (dynamic or static cache)")
        ours, settings = _NOISE_KEY_LAYERS[type(layer)]
        kwargs = settings(layer)
        upgraded = ours(**kwargs)
        upgraded.__dict__.update(layer.__dict__)  # what the cache set after construction (e.g. past recording)
        upgraded.noise_keys = type(layer)(**kwargs)
        if getattr(layer, "record_past", False):  # generate() armed it for rolling back drafts: the noise keys too
            upgraded.noise_keys.activate_past_recording()
        cache.layers[layer_idx] = upgraded
