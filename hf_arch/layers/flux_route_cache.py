"""Cache layers that remember Flux's per-row route (full or sparse attention), decided once on the prompt.

Decode steps reuse the prompt's choice; it lives in the layer's cache entry (not as an attribute set on
transformers' object), so beam reordering and batch expansion move it with the rows it belongs to.
"""

from __future__ import annotations

import torch

from .cache_extensions import extend_layer, extended_layer_classes

__all__ = ["FluxRouteLayerMixin", "flux_route_layer"]


class FluxRouteLayerMixin:
    """``self.route``: ``[B]`` bool (True = the row attends sparsely), None until the prompt is routed."""

    route: torch.Tensor | None = None

    def start_extension(self, kind: type, settings: dict) -> None:
        self.route = None

    def reset(self) -> None:
        super().reset()
        self.route = None

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        if self.route is not None:
            self.route = self.route.index_select(0, beam_idx.to(self.route.device))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        if self.route is not None:
            self.route = self.route.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        if self.route is not None:
            self.route = self.route[indices]


FLUX_ROUTE_LAYERS = extended_layer_classes(FluxRouteLayerMixin)


def flux_route_layer(cache, layer_idx: int):
    """The cache layer at ``layer_idx``, able to hold a route (extended in place the first time)."""
    return extend_layer(cache, layer_idx, FLUX_ROUTE_LAYERS, "Flux route")
