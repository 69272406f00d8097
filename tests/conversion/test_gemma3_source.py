"""Gemma 3 (text) sources: zero-centred (1 + w) sandwich norms, per-head q/k norms, √hidden embedding scale,
``query_pre_attn_scalar`` and local / global layers with their own RoPE, carried exactly by the conversions that are
exact; what the backbone cannot express (soft-capping, a GELU FFN as SwiGLU experts) refused by name."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma3TextConfig

from hf_arch import GatedAttentionConfig, GatedAttentionForCausalLM
from hf_arch.conversion import (
    LinearizeOptions, MoERefactorOptions, SparsifyOptions, convert, insert_value_bank, linearize, refactor_moe,
    sparsify,
)

DIMS = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=12, sliding_window=8,
            max_position_embeddings=128, layer_types=["sliding_attention", "sliding_attention", "full_attention"])


def _gemma3(**extra):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(Gemma3TextConfig(**{**DIMS, **extra})).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.normal_(0.0, 0.5)  # zero-centred: the scale is 1 + w
    return model


def _ids(T=40):
    return torch.randint(3, DIMS["vocab_size"], (2, T), generator=torch.Generator().manual_seed(1))


def _max_diff(a, b, **kwargs):
    with torch.no_grad():
        return (a(_ids(), **kwargs).logits - b(_ids()).logits).abs().max().item()


def test_convert_generates_as_the_source_past_the_window(tmp_path):
    source = _gemma3()
    assert source.config.rope_parameters["sliding_attention"] != source.config.rope_parameters["full_attention"]
    source.save_pretrained(tmp_path / "gemma3")
    result = convert(tmp_path / "gemma3", tmp_path / "gated", verify_tokens=24)
    assert result.max_abs_logit_diff <= 1e-5
    ours = AutoModelForCausalLM.from_pretrained(tmp_path / "gated", dtype=torch.float32).eval()
    config = ours.config
    assert (config.norm_placement, config.norm_weight_offset, config.query_pre_attn_scalar) == ("sandwich", 1.0, 12)
    assert config.embedding_multiplier == pytest.approx(32**0.5) and config.hidden_act == "gelu_pytorch_tanh"
    assert set(config.rope_parameters) == {"sliding_attention", "full_attention"}
    ids = _ids(20)[:1]
    kwargs = dict(max_new_tokens=12, do_sample=False)
    assert torch.equal(ours.generate(ids, **kwargs), source.generate(ids, **kwargs))


def test_exact_conversions_and_linearization():
    source = _gemma3()
    assert _max_diff(insert_value_bank(source), source) <= 1e-5
    sparse = sparsify(source, SparsifyOptions(method="seer", block_size=16))
    assert _max_diff(sparse, source, sparse_attention_mode="dense") <= 1e-5
    linear = linearize(source, LinearizeOptions(method="liger"), to="gla")
    state = linear.state_dict()
    for name, tensor in source.state_dict().items():
        if "norm" in name:
            assert torch.equal(state[name], tensor), name
    assert torch.isfinite(linear(_ids()).logits).all()
    # Attention transfer's teachers are the source layers' softmax attention, each with its own RoPE (local for
    # the linearized sliding layers): run as the layers' outputs, they give the source's logits.
    assert [layer.rope_layer_type for layer in linear.model.layers] == DIMS["layer_types"]
    short = _ids(8)  # within the window: the teachers attend causally without one
    with torch.no_grad():
        teacher_logits = linear(short, attention_transfer=True, use_cache=False).logits
        assert (teacher_logits - source(short).logits).abs().max().item() <= 1e-5


def test_what_cannot_be_expressed_is_refused():
    with pytest.raises(ValueError, match="SwiGLU"):
        refactor_moe(_gemma3(), MoERefactorOptions(method="upcycle", experts=2, top_k=2))
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        convert_source = _gemma3(final_logit_softcapping=30.0)
        linearize(convert_source, LinearizeOptions(method="mamba_init"), to="gated_deltanet")


def test_zero_centred_norms_start_as_the_identity():
    config = GatedAttentionConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, norm_weight_offset=1.0,
                                  norm_placement="sandwich", qk_norm=True)
    model = GatedAttentionForCausalLM(config)
    layer = model.model.layers[0]
    for norm in (layer.input_layernorm, layer.pre_feedforward_layernorm, layer.self_attn.q_norm, model.model.norm):
        assert torch.equal(norm.weight, torch.zeros_like(norm.weight))
    x = torch.randn(2, 3, 32)
    expected = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + config.rms_norm_eps)
    torch.testing.assert_close(layer.input_layernorm(x), expected)


def test_rope_per_layer_type_must_cover_the_layers():
    with pytest.raises(ValueError, match="none for \\['sliding_attention'\\]"):
        GatedAttentionConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, sliding_window=8,
                             layer_types=["sliding_attention", "full_attention"],
                             rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e4}})
