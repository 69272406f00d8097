"""Flux's per-row route lives in the layer's cache entry: cache operations on rows move it with them."""

from __future__ import annotations

import pytest
import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

from hf_arch.layers.flux_route_cache import FluxRouteLayerMixin, flux_route_layer


def _cache_with_route(route):
    cache = DynamicCache()
    cache.layers.append(DynamicLayer())
    layer = flux_route_layer(cache, 0)
    layer.update(torch.zeros(len(route), 1, 2, 4), torch.zeros(len(route), 1, 2, 4))
    layer.route = torch.tensor(route)
    return cache, layer


def test_route_follows_beam_reorder_batch_expansion_selection_and_reset():
    cache, layer = _cache_with_route([True, False])
    assert isinstance(cache.layers[0], FluxRouteLayerMixin) and flux_route_layer(cache, 0) is layer
    layer.reorder_cache(torch.tensor([1, 0]))
    assert layer.route.tolist() == [False, True]
    layer.batch_repeat_interleave(2)
    assert layer.route.tolist() == [False, False, True, True] and layer.keys.shape[0] == 4
    layer.batch_select_indices(torch.tensor([0, 3]))
    assert layer.route.tolist() == [False, True]
    layer.reset()
    assert layer.route is None


def test_a_layer_filled_without_a_route_is_refused_by_name():
    cache = DynamicCache()
    cache.layers.append(DynamicLayer())
    cache.layers[0].update(torch.zeros(1, 1, 2, 4), torch.zeros(1, 1, 2, 4))
    with pytest.raises(ValueError, match="already holds keys but no Flux route"):
        flux_route_layer(cache, 0)
