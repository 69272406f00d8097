"""A linear layer's token count lives in its cache entry (token_count_cache), not in an attribute set on transformers'
object; and the per-forward training terms of token mixers come back as outputs (layers.auxiliary)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.cache_utils import DynamicCache, LinearAttentionLayer

from hf_arch import GatedDeltaNetConfig, GLAConfig
from hf_arch.layers.auxiliary import merge_auxiliary, split_mixer_result
from hf_arch.layers.token_count_cache import TokenCountLayerMixin, token_count_layer

TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, pad_token_id=0)


def ids(B, T, seed=0):
    return torch.randint(3, 64, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("config", [GatedDeltaNetConfig(**TINY, linear_attn_conv_size=0),  # no conv: no 5.25 counter
                                    GLAConfig(**TINY, linear_attn_hybrid="liger", sliding_window=3)])
@torch.no_grad()
def test_linear_layers_count_tokens_in_their_cache_entries(config):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    out = model(ids(2, 7), use_cache=True)
    cache = out.past_key_values
    assert all(isinstance(layer, TokenCountLayerMixin) and layer.seen_tokens == 7 for layer in cache.layers)
    assert not any(hasattr(layer, "hf_arch_seen_tokens") for layer in cache.layers)
    model(ids(2, 3, seed=1), cache=cache, use_cache=True)
    assert cache.get_seq_length() == 10 and cache.layers[0].seen_tokens == 10
    cache.reset()
    assert cache.layers[0].seen_tokens == 0


def test_a_linear_layer_filled_without_a_count_is_refused_by_name():
    cache = DynamicCache()
    cache.layers.append(LinearAttentionLayer())
    cache.layers[0].update_recurrent_state(torch.zeros(1, 2, 4, 4), 0)
    with pytest.raises(ValueError, match="already holds states but no token count"):
        token_count_layer(cache, 0)


def test_mixer_results_with_and_without_auxiliary_outputs():
    out = torch.zeros(1)
    assert split_mixer_result((out, None)) == (out, None, {})
    loss = torch.tensor(1.0)
    assert split_mixer_result((out, None, {"gate_loss": loss}))[2] == {"gate_loss": loss}
    with pytest.raises(ValueError, match=r"unknown auxiliary outputs \['my_loss'\]"):
        split_mixer_result((out, None, {"my_loss": loss}))
    merged = merge_auxiliary([{"gate_loss": torch.tensor(1.0), "sparse_choice": torch.tensor([True]),
                               "block_counts": torch.tensor([2, 3])},
                              {"gate_loss": torch.tensor(3.0), "sparse_choice": torch.tensor([False]),
                               "block_counts": torch.tensor([1, 3])}])
    assert merged["gate_loss"] == 2.0 and merged["sparse_choice"].tolist() == [True, False]
    assert merged["block_counts"].tolist() == [3, 6]


def test_modes_are_arguments_of_one_call_and_unknown_modes_are_refused():
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(GLAConfig(**TINY)).eval()
    with torch.no_grad():
        transfer = model(ids(1, 5), use_cache=False, attention_transfer=True)
        plain = model(ids(1, 5), use_cache=False)
    assert len(transfer.transfer_losses) == 2 and plain.transfer_losses is None
    assert not any(hasattr(m, "attention_transfer") or hasattr(m, "transfer_loss") for m in model.modules())
    with pytest.raises(ValueError, match="sparse_attention_mode must be None or one of"):
        model(ids(1, 5), sparse_attention_mode="sparse")
