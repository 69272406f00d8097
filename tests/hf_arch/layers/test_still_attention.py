"""STILL layers (``linear_attn_hybrid='still'``): the layer equals the quadratic reference of kernels/still on its own
projections, keeps every key in a ``hybrid`` cache layer with the tokens' saliencies beside them, refuses packing
and bad settings by name."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from hf_arch import GLAConfig
from hf_arch.kernels.still import naive_still_attention
from hf_arch.layers.rope import apply_rotary_pos_emb

TINY = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, eos_token_id=1, bos_token_id=2)
STILL = dict(linear_attn_gate="scalar", linear_attn_feature_map="np_map", linear_attn_normalize=True,
             linear_attn_hybrid="still", sliding_window=4, linear_attn_selection_block=3, linear_attn_selection_topk=1,
             linear_attn_mix_weights=[0.8, 0.3], linear_attn_output_norm="none", linear_attn_conv_size=0)


def still_model(seed: int = 0, **overrides):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(GLAConfig(**TINY, **{**STILL, **overrides})).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("window_factor"):
                param.normal_()
            if name.endswith("feature_map"):
                param.add_(0.3 * torch.randn_like(param))
    return model


@torch.no_grad()
def test_layer_equals_the_quadratic_reference():
    model = still_model()
    layer = model.model.layers[0].self_attn
    B, T, H, H_kv, D = 2, 19, 4, 2, layer.head_dim
    x = torch.randn(B, T, TINY["hidden_size"])
    cos, sin = model.model.rotary_emb(x, torch.arange(T)[None])
    out = layer(x, position_embeddings=(cos, sin))[0]

    q, k = layer.q_proj(x).view(B, T, H, D), layer.k_proj(x).view(B, T, H_kv, D)
    v = layer.v_proj(x).view(B, T, H_kv, D)
    qr, kr = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
    fq, fk = layer._feature_maps(q, k)
    g, _ = layer._gates(x, k)
    g = torch.cat([g, g], dim=-1) if g.shape[-1] != fq.shape[-1] else g
    ref, selected = naive_still_attention(qr.transpose(1, 2), kr.transpose(1, 2), v, fq, fk, g, window=4, block=3,
                                          topk=1, scale=layer.scaling, linear_weight=0.8,
                                          softmax_weight=torch.sigmoid(layer.window_factor))
    assert selected.sum() == B * (T // 3) * H_kv  # one token per complete block and key head
    torch.testing.assert_close(out, layer.o_proj(ref.reshape(B, T, H * D)), rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_cache_keeps_every_key_and_the_saliencies():
    model = still_model()
    ids = torch.randint(3, 96, (2, 11), generator=torch.Generator().manual_seed(1))
    cache = model(ids, use_cache=True).past_key_values
    entry = cache.layers[0]
    assert type(entry).__name__.startswith("Saliency") and entry.saliency.shape == (2, 11, 2)
    assert cache.get_seq_length() == 11 and entry.keys.shape[-2] == 11  # every key, not a window
    assert model.config.layer_types == ["hybrid", "hybrid"]


def test_packing_and_bad_settings_are_refused():
    model = still_model()
    packed = torch.randint(3, 96, (1, 10))
    with pytest.raises(NotImplementedError, match="STILL layers do not take packed sequences"):
        model(packed, position_ids=torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4, 5]]))
    with pytest.raises(ValueError, match="linear_attn_selection_block \\(5\\) must not exceed sliding_window \\(4\\)"):
        GLAConfig(**TINY, **{**STILL, "linear_attn_selection_block": 5})
    with pytest.raises(ValueError, match="linear_attn_selection_topk \\(4\\) must not exceed"):
        GLAConfig(**TINY, **{**STILL, "linear_attn_selection_topk": 4})
    with pytest.raises(ValueError, match="needs linear_attn_normalize=True"):
        GLAConfig(**TINY, **{**STILL, "linear_attn_normalize": False})
    with pytest.raises(ValueError, match="linear_attn_selection_block"):  # an option of a mechanism that is off
        GLAConfig(**TINY, linear_attn_selection_block=8)
