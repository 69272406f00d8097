"""Phi-3 sources: rewritten exactly as Mistral, then every conversion kind takes them; what cannot be is refused."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, Phi3Config

from hf_arch.conversion import RECORD_FILE, LinearizeOptions, MoERefactorOptions, convert, linearize, refactor_moe
from hf_arch.conversion.phi3_source import phi3_as_mistral
from hf_arch.conversion.sources import backbone_source


def _phi3(**extra):
    config = Phi3Config(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                        pad_token_id=None, bos_token_id=1, eos_token_id=2, **extra)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.normal_(1.0, 0.5)
    return model


def _max_diff(a, b, vocab=96, T=40):
    ids = torch.randint(0, vocab, (2, T), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return (a(ids).logits - b(ids).logits).abs().max().item()


@pytest.mark.parametrize("extra", [{}, {"sliding_window": 8}], ids=["full", "window"])
def test_phi3_as_mistral_splits_the_fused_projections_exactly(extra):
    source = _phi3(**extra)
    mistral = phi3_as_mistral(source)
    assert mistral.config.model_type == "mistral" and mistral.config.sliding_window == extra.get("sliding_window")
    layer = source.model.layers[0]
    q_rows = source.config.num_attention_heads * 8
    assert torch.equal(mistral.model.layers[0].self_attn.q_proj.weight, layer.self_attn.qkv_proj.weight[:q_rows])
    assert torch.equal(mistral.model.layers[0].mlp.up_proj.weight, layer.mlp.gate_up_proj.weight[48:])
    assert _max_diff(source, mistral, T=40) <= 1e-5  # T > window: the window is kept on every layer
    assert backbone_source(mistral) is mistral  # a Llama-family model passes through unchanged


def test_conversions_take_a_phi3_source():
    source = _phi3(sliding_window=8)
    moe = refactor_moe(source, MoERefactorOptions(method="upcycle", experts=2, top_k=2))
    assert _max_diff(source, moe) <= 1e-5
    linear = linearize(source, LinearizeOptions(method="mamba_init"), to="gated_deltanet")
    assert linear.config.num_hidden_layers == 2
    for name, tensor in moe.state_dict().items():  # attention weights reached both through the split projections
        if "self_attn.k_proj" in name:
            assert torch.equal(linear.state_dict()[name], tensor)
    assert torch.isfinite(linear(torch.tensor([[1, 2, 3]])).logits).all()


def test_convert_writes_a_phi3_conversion_with_its_record(tmp_path):
    src = tmp_path / "phi3"
    _phi3(sliding_window=8).save_pretrained(src)
    result = convert(src, tmp_path / "gated", verify_tokens=24)
    assert result.max_abs_logit_diff <= 1e-5
    record = json.loads((tmp_path / "gated" / RECORD_FILE).read_text())
    assert record["source_model_type"] == "phi3" and record["model_type"] == "hfa_gated_attention"
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "gated", dtype=torch.float32)
    assert _max_diff(AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval(), reloaded.eval()) <= 1e-5


@pytest.mark.parametrize("rope, match", [
    ({"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}, "partial_rotary_factor"),
    ({"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0] * 4, "long_factor": [2.0] * 4,
      "original_max_position_embeddings": 64}, "longrope"),
])
def test_phi3_features_without_an_exact_form_are_refused(rope, match):
    with pytest.raises(ValueError, match=match):
        phi3_as_mistral(_phi3(rope_parameters=rope))
