"""Per-layer state a mixer keeps beside transformers' keys and values, in the cache layer itself.

A mixer that must remember something per layer between forwards (GDA's noise keys, Flux's per-row route, a linear
layer's token count) extends the cache layer with a mixin instead of setting attributes on transformers' objects: the
mixin subclasses each of transformers' attention layer kinds (dynamic, sliding, static, static sliding), or each of
its linear-attention layer kinds (``linear=True``: linear, and linear + full / sliding attention, dynamic or static),
so its state follows every cache operation (crop, beam reorder, batch expansion, reset) and the layer's own keys,
values and states keep transformers' shapes. The classes are made once, at import (a traced forward must not create
classes).
"""

from __future__ import annotations

from transformers.cache_utils import (
    DynamicLayer,
    DynamicSlidingWindowLayer,
    LinearAttentionAndFullAttentionLayer,
    LinearAttentionAndSlidingWindowAttentionLayer,
    LinearAttentionAndStaticFullAttentionLayer,
    LinearAttentionAndStaticSlidingWindowAttentionLayer,
    LinearAttentionLayer,
    StaticLayer,
    StaticSlidingWindowLayer,
)

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
# The same for transformers' linear-attention layer kinds (the layer types linear_attention and hybrid_sliding build;
# hybrid for completeness).
_LINEAR_SETTINGS = {
    LinearAttentionLayer: lambda layer: {"number_of_states": layer.number_of_states},
    LinearAttentionAndFullAttentionLayer: lambda layer: {"number_of_states": layer.number_of_states},
    LinearAttentionAndSlidingWindowAttentionLayer: lambda layer: {"sliding_window": layer.sliding_window,
                                                                  "number_of_states": layer.number_of_states},
    LinearAttentionAndStaticFullAttentionLayer: lambda layer: {"max_cache_len": layer.max_cache_len,
                                                               "number_of_states": layer.number_of_states},
    LinearAttentionAndStaticSlidingWindowAttentionLayer: lambda layer: {
        "max_cache_len": layer.max_cache_len, "sliding_window": layer.max_cache_len,
        "number_of_states": layer.number_of_states},
}


def extended_layer_classes(mixin: type, linear: bool = False) -> dict[type, type]:
    """``{transformers layer kind: mixin + that kind}`` for its attention layer kinds, or its linear-attention ones
    (``linear``); call at import time."""
    stem = mixin.__name__.removesuffix("Mixin")
    kinds = _LINEAR_SETTINGS if linear else _SETTINGS
    return {base: type(f"{stem}{base.__name__}", (mixin, base), {"__module__": mixin.__module__}) for base in kinds}


def _holds_state(layer) -> bool:
    """Whether a cache layer already holds keys or linear-attention states."""
    return bool(getattr(layer, "is_initialized", False)
                or any(getattr(layer, "is_conv_states_initialized", {}).values())
                or any(getattr(layer, "is_recurrent_states_initialized", {}).values()))


def extend_layer(cache, layer_idx: int, classes: dict[type, type], what: str):
    """The cache layer at ``layer_idx`` as its extended class (``classes`` from :func:`extended_layer_classes`),
    replaced in place the first time; returns it. The layer must still be empty: state that a cache filled without
    the extension lacks cannot be made up. ``what`` names the state in errors."""
    layer = cache.layers[layer_idx]
    if type(layer) in classes.values():
        return layer
    if _holds_state(layer):
        held = "keys" if getattr(layer, "is_initialized", False) else "states"
        raise ValueError(f"cache layer {layer_idx} ({type(layer).__name__}) already holds {held} but no {what}: "
                         "continue only from a cache this model filled")
    if type(layer) not in classes:
        raise ValueError(f"cache layer {layer_idx} is a {type(layer).__name__}, which cannot carry {what}; use one of "
                         f"{sorted(kind.__name__ for kind in classes)} (dynamic or static cache)")
    settings = {**_SETTINGS, **_LINEAR_SETTINGS}[type(layer)](layer)
    extended = classes[type(layer)](**settings)
    extended.__dict__.update(layer.__dict__)  # what the cache set after construction (e.g. past recording)
    extended.start_extension(type(layer), settings)
    cache.layers[layer_idx] = extended
    return extended
