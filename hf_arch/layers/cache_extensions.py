"""Per-layer state a mixer keeps beside transformers' keys and values, in the cache layer itself.

A mixer that must remember something per layer between forwards (GDA's noise keys, Flux's per-row route) extends
the cache layer with a mixin instead of setting attributes on transformers' objects: the mixin subclasses each of
transformers' attention layer kinds (dynamic, sliding, static, static sliding), so its state follows every cache
operation (crop, beam reorder, batch expansion, reset) and the layer's own keys and values keep transformers' shapes.
The classes are made once, at import (a traced forward must not create classes).
"""

from __future__ import annotations

from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer, StaticLayer, StaticSlidingWindowLayer

__all__ = ["extend_layer", "extended_layer_classes"]

# transformers' layer kind -> its constructor's settings, read from an instance. Exact types: a subclass may store
# more. A static sliding layer keeps only min(window, max_cache_len) as its max_cache_len: passing it as both gives
# the same buffer.
_SETTINGS = {
    DynamicLayer: lambda layer: {},
    DynamicSlidingWindowLayer: lambda layer: {"sliding_window": layer.sliding_window},
    StaticLayer: lambda layer: {"max_cache_len": layer.max_cache_len},
    StaticSlidingWindowLayer: lambda layer: {"max_cache_len": layer.max_cache_len, "sliding_window": layer.max_cache_len},
}


def extended_layer_classes(mixin: type) -> dict[type, type]:
    """``{transformers layer kind: mixin + that kind}`` (call at import time)."""
    stem = mixin.__name__.removesuffix("Mixin")
    return {base: type(f"{stem}{base.__name__}", (mixin, base), {"__module__": mixin.__module__}) for base in _SETTINGS}


def extend_layer(cache, layer_idx: int, classes: dict[type, type], what: str):
    """The cache layer at ``layer_idx`` as its extended class (``classes`` from :func:`extended_layer_classes`),
    replaced in place the first time; returns it. The layer must still be empty: state that a cache filled without
    the extension lacks cannot be made up. ``what`` names the state in errors."""
    layer = cache.layers[layer_idx]
    if type(layer) in classes.values():
        return layer
    if getattr(layer, "is_initialized", False):
        raise ValueError(f"cache layer {layer_idx} ({type(layer).__name__}) already holds keys but no {what}: "
                         "continue only from a cache this model filled")
    if type(layer) not in classes:
        raise ValueError(f"cache layer {layer_idx} is a {type(layer).__name__}, which cannot carry {what}; use one of "
                         f"{sorted(kind.__name__ for kind in classes)} (dynamic or static cache)")
    settings = _SETTINGS[type(layer)](layer)
    extended = classes[type(layer)](**settings)
    extended.__dict__.update(layer.__dict__)  # what the cache set after construction (e.g. past recording)
    extended.start_extension(type(layer), settings)
    cache.layers[layer_idx] = extended
    return extended
