"""Cache layers that keep STILL's self-saliency per token beside the keys, values and linear state.

A STILL layer decides which old tokens stay softmax keys from every past token's self-saliency (``kernels.still``),
so the scores of earlier calls must survive between forwards: they live in the layer's cache entry (a
``hybrid`` layer: linear state plus every key), extended in place with this mixin, which also counts tokens
(``TokenCountLayerMixin``); beam reordering, batch expansion and selection, cropping and reset move them with the
rest.
"""

from __future__ import annotations

import torch

from .cache_extensions import extend_layer, extended_layer_classes
from .token_count_cache import TokenCountLayerMixin

__all__ = ["SaliencyLayerMixin", "SALIENCY_LAYERS", "saliency_layer"]


class SaliencyLayerMixin(TokenCountLayerMixin):
    """``self.saliency``: ``[B, tokens so far, H_kv]`` (None before the first call)."""

    saliency: torch.Tensor | None = None

    def start_extension(self, kind: type, settings: dict) -> None:
        super().start_extension(kind, settings)
        self.saliency = None

    def reset(self) -> None:
        super().reset()
        self.saliency = None

    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)
        if self.saliency is not None:
            self.saliency = self.saliency[:, : self.seen_tokens]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        if self.saliency is not None:
            self.saliency = self.saliency.index_select(0, beam_idx.to(self.saliency.device))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        if self.saliency is not None:
            self.saliency = self.saliency.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        if self.saliency is not None:
            self.saliency = self.saliency[indices]


SALIENCY_LAYERS = extended_layer_classes(SaliencyLayerMixin, linear=True)


def saliency_layer(cache, layer_idx: int):
    """The linear-attention cache layer at ``layer_idx``, able to keep saliencies (extended in place the first time)."""
    return extend_layer(cache, layer_idx, SALIENCY_LAYERS, "token saliencies")
