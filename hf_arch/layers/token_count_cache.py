"""Cache layers that count the tokens a linear-attention layer has taken in.

A linear layer keeps a fixed-size state, so nothing in it says how many tokens it has seen; yet ``get_seq_length()``
of an all-linear model (or of a hybrid whose first attention layer is far away) needs that count to place the next
token. transformers 5.17's ``LinearAttentionLayer`` keeps no count; 5.25's ``cumulative_length_linear`` advances only
through ``update_conv_state`` (a layer without a short conv never calls it). The count therefore lives in the layer's
cache entry, extended in place with this mixin (``cache_extensions``), so reset and rollback move it with the state.
"""

from __future__ import annotations

from .cache_extensions import extend_layer, extended_layer_classes

__all__ = ["TokenCountLayerMixin", "token_count_layer"]


class TokenCountLayerMixin:
    """``self.seen_tokens``: tokens taken in so far (padding included, as a key/value layer counts its slots)."""

    seen_tokens: int = 0

    def start_extension(self, kind: type, settings: dict) -> None:
        self.seen_tokens = 0

    def add_tokens(self, count: int) -> None:
        self.seen_tokens += count

    def reset(self) -> None:
        super().reset()
        self.seen_tokens = 0

    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)  # linear layers take a negative count (and refuse unless recording the past)
        self.seen_tokens -= abs(tokens_to_remove)


TOKEN_COUNT_LAYERS = extended_layer_classes(TokenCountLayerMixin, linear=True)


def token_count_layer(cache, layer_idx: int):
    """The linear-attention cache layer at ``layer_idx``, able to count tokens (extended in place the first time)."""
    return extend_layer(cache, layer_idx, TOKEN_COUNT_LAYERS, "token count")
