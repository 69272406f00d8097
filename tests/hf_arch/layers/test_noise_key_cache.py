"""Grouped Differential Attention's noise keys ride in a companion of the layer's cache entry: the entry keeps
transformers' key/value shapes, and every cache operation (crop, beam reorder, static slots, sliding) moves the noise
keys with the keys."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.cache_utils import DynamicCache, StaticCache

import hf_arch
from hf_arch.layers.noise_key_cache import NoiseKeyLayerMixin
from hf_arch.models.cache_names import CACHE_OUTPUT_FIELD

TINY = dict(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, diff_attn_noise_heads=2, max_position_embeddings=64)


def gda_model(**extra):
    torch.manual_seed(0)
    config = hf_arch.get_variant("diff_attention").config_class(**{**TINY, **extra})
    return AutoModelForCausalLM.from_config(config).eval()


def ids(length=10, batch=2):
    return torch.randint(0, TINY["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(3))


@torch.no_grad()
@pytest.mark.parametrize("extra", [{}, dict(sliding_window=3, layer_types=["sliding_attention", "full_attention"])],
                         ids=["full", "sliding"])
def test_entries_keep_standard_shapes_and_noise_keys_follow_the_keys(extra):
    model = gda_model(**extra)
    cache = getattr(model(ids(), use_cache=True), CACHE_OUTPUT_FIELD)
    for layer in cache.layers:
        assert isinstance(layer, NoiseKeyLayerMixin)
        assert layer.keys.shape[1:] == (TINY["num_key_value_heads"], layer.keys.shape[2], 8)
        assert layer.noise_keys.keys.shape[:3] == (2, TINY["diff_attn_noise_heads"], layer.keys.shape[2])


@torch.no_grad()
def test_crop_then_continue_equals_the_full_forward():
    model, tokens = gda_model(), ids(12)
    full = model(tokens).logits
    cache = getattr(model(tokens[:, :9], use_cache=True), CACHE_OUTPUT_FIELD)
    cache.crop(-3)  # drop the last three tokens, keys and noise keys alike
    assert cache.layers[0].noise_keys.keys.shape[2] == 6
    resumed = model(tokens[:, 6:], **{CACHE_OUTPUT_FIELD: cache}, use_cache=True).logits
    torch.testing.assert_close(resumed, full[:, 6:], rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_beam_reorder_moves_noise_keys_with_their_rows():
    model, tokens = gda_model(), ids(8)
    cache = getattr(model(tokens, use_cache=True), CACHE_OUTPUT_FIELD)
    before = cache.layers[1].noise_keys.keys.clone()
    cache.reorder_cache(torch.tensor([1, 0]))
    torch.testing.assert_close(cache.layers[1].noise_keys.keys, before.flip(0))


@torch.no_grad()
@pytest.mark.parametrize("kind", ["dynamic", "static"])
def test_a_cache_made_elsewhere_gets_noise_keys_on_first_use(kind):
    model, tokens = gda_model(), ids(10)
    full = model(tokens).logits
    cache = (DynamicCache(config=model.config) if kind == "dynamic"
             else StaticCache(config=model.config, max_cache_len=16))
    first = model(tokens[:, :7], **{CACHE_OUTPUT_FIELD: cache}, use_cache=True).logits
    rest = model(tokens[:, 7:], **{CACHE_OUTPUT_FIELD: cache}, use_cache=True).logits
    torch.testing.assert_close(torch.cat([first, rest], 1), full, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_a_cache_filled_without_noise_keys_is_refused_by_name():
    model, tokens = gda_model(), ids(6)
    plain = DynamicCache(config=model.config)
    plain.update(torch.zeros(2, 2, 6, 8), torch.zeros(2, 2, 6, 8), 0)
    with pytest.raises(ValueError, match="already holds keys but no Grouped Differential Attention noise keys"):
        model(tokens, **{CACHE_OUTPUT_FIELD: plain}, use_cache=True)
