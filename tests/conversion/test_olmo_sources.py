"""OLMo-2 / OLMo-3 sources: q/k RMSNorm over the whole projection and norms on the branches' outputs
(``qk_norm_scope="projection"``, ``norm_placement="post"``) carried by every conversion kind, exact where the
conversion is; per-layer-type RoPE that differs is refused by name."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, Olmo2Config, Olmo3Config

from hf_arch.conversion import (
    RECORD_FILE, LinearizeOptions, MoERefactorOptions, SparsifyOptions, convert, insert_value_bank, linearize,
    refactor_moe, sparsify,
)

DIMS = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def _olmo(config_class=Olmo2Config, **extra):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config_class(**DIMS, **extra)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.normal_(1.0, 0.5)
    return model


def _max_diff(a, b, T=40):
    ids = torch.randint(0, DIMS["vocab_size"], (2, T), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return (a(ids).logits - b(ids).logits).abs().max().item()


def test_every_exact_conversion_kind_keeps_an_olmo2_source():
    source = _olmo()
    partition = refactor_moe(source, MoERefactorOptions(method="partition", experts=2, top_k=2, split="random",
                                                       shared_neurons=0, router_distill_steps=0))
    assert partition.config.norm_placement == "post" and partition.config.qk_norm_scope == "projection"
    layer = partition.model.layers[0]
    assert layer.input_layernorm is None and layer.post_feedforward_layernorm is not None
    assert layer.self_attn.q_norm.weight.shape == (4 * 8,)  # the whole projection: heads × head_dim
    assert _max_diff(source, partition) <= 1e-5
    assert _max_diff(source, insert_value_bank(source)) <= 1e-5
    sparse = sparsify(source, SparsifyOptions(method="seer", block_size=16))
    ids = torch.randint(0, DIMS["vocab_size"], (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # the base model's function through the converted weights
        diff = (sparse(ids, sparse_attention_mode="dense").logits - source(ids).logits).abs().max().item()
    assert diff <= 1e-5


def test_linearizations_carry_the_projection_norms():
    source = _olmo()
    for method, to in (("mamba_init", "gated_deltanet"), ("liger", "gla")):
        linear = linearize(source, LinearizeOptions(method=method), to=to)
        state = linear.state_dict()
        for name, tensor in source.state_dict().items():
            if "q_norm" in name or "post_feedforward_layernorm" in name:
                assert torch.equal(state[name], tensor), (method, name)
        assert torch.isfinite(linear(torch.tensor([[1, 2, 3]])).logits).all()


def test_convert_writes_an_olmo3_conversion_that_generates_as_the_source(tmp_path):
    src = tmp_path / "olmo3"
    _olmo(Olmo3Config, sliding_window=8, layer_types=["sliding_attention", "full_attention"]).save_pretrained(src)
    result = convert(src, tmp_path / "gated", verify_tokens=24)
    assert result.max_abs_logit_diff <= 1e-5
    record = json.loads((tmp_path / "gated" / RECORD_FILE).read_text())
    assert record["source_model_type"] == "olmo3"
    ours = AutoModelForCausalLM.from_pretrained(tmp_path / "gated", dtype=torch.float32).eval()
    theirs = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    ids = torch.randint(3, DIMS["vocab_size"], (1, 20), generator=torch.Generator().manual_seed(2))
    kwargs = dict(max_new_tokens=12, do_sample=False)  # past the window: the cache keeps it per layer
    assert torch.equal(ours.generate(ids, **kwargs), theirs.generate(ids, **kwargs))


def test_per_layer_type_rope_is_kept_and_exact():
    rope = {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "linear", "rope_theta": 500000.0, "factor": 4.0}}
    source = _olmo(Olmo3Config, sliding_window=8, layer_types=["sliding_attention", "full_attention"],
                   rope_parameters=rope)
    moe = refactor_moe(source, MoERefactorOptions(method="upcycle", experts=2, top_k=2))
    assert set(moe.config.rope_parameters) == {"sliding_attention", "full_attention"}
    assert _max_diff(source, moe) <= 1e-5


def test_expert_pool_needs_an_explicit_bias_under_post_norms():
    with pytest.raises(ValueError, match="post norms"):
        refactor_moe(_olmo(), MoERefactorOptions(method="upcycle", experts=2, top_k=2, pool=True))
