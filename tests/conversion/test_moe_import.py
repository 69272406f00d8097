"""Native MoE sources (Qwen3-MoE, Mixtral, Qwen2-MoE) imported exactly with ``--to moe --method native``; the other
conversions and options refuse them by name; a round trip through the native export gives the source back."""

import pytest
import torch
from transformers import AutoModelForCausalLM, MixtralConfig, Qwen2MoeConfig, Qwen3MoeConfig

from hf_arch.conversion import MoERefactorOptions, convert, insert_gates, refactor_moe
from hf_arch.conversion.moe_import import moe_from_native

DIMS = dict(vocab_size=96, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=128, pad_token_id=None, bos_token_id=1, eos_token_id=2)
SOURCES = {
    "qwen3_moe": lambda: Qwen3MoeConfig(**DIMS, head_dim=16, intermediate_size=64, moe_intermediate_size=24,
                                        num_experts=4, num_experts_per_tok=2, norm_topk_prob=True,
                                        mlp_only_layers=[1], attention_bias=True),
    "qwen3_moe_unnormalised": lambda: Qwen3MoeConfig(**DIMS, intermediate_size=64, moe_intermediate_size=24,
                                                     num_experts=4, num_experts_per_tok=2, norm_topk_prob=False),
    "mixtral": lambda: MixtralConfig(**DIMS, intermediate_size=24, num_local_experts=4, num_experts_per_tok=2,
                                     sliding_window=8),
    "qwen2_moe": lambda: Qwen2MoeConfig(**DIMS, intermediate_size=64, moe_intermediate_size=24, num_experts=4,
                                        num_experts_per_tok=2, shared_expert_intermediate_size=40,
                                        decoder_sparse_step=2, norm_topk_prob=False),
}


def _source(name):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(SOURCES[name]()).eval()
    with torch.no_grad():  # random norms and biases, so a dropped tensor shows in the logits
        for param_name, param in model.named_parameters():
            if "norm" in param_name or param_name.endswith("bias"):
                param.normal_(1.0 if "norm" in param_name else 0.0, 0.5)
    return model


def _max_diff(a, b, T=40):
    ids = torch.randint(0, 96, (2, T), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return (a(ids).logits - b(ids).logits).abs().max().item()


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_native_moe_imports_exactly(name):
    source = _source(name)
    target = refactor_moe(source, MoERefactorOptions(method="native"))
    assert target.config.model_type == "hfa_moe" and target.config.moe_router == "softmax_topk"
    assert _max_diff(source, target) <= 1e-5
    expected_types = {"qwen3_moe": ["sparse", "dense", "sparse"], "qwen2_moe": ["dense", "sparse", "dense"]}
    assert target.config.mlp_layer_types == expected_types.get(name, ["sparse"] * 3)
    assert target.conversion_report["imported_from"] == source.config.model_type
    with torch.no_grad():  # cached greedy decoding agrees with the source's
        prompt = torch.tensor([[1, 5, 9, 3]])
        ours = target.generate(prompt, max_new_tokens=8, do_sample=False)
        theirs = source.generate(prompt, max_new_tokens=8, do_sample=False)
    assert torch.equal(ours, theirs)


def test_native_export_of_an_import_gives_the_source_back(tmp_path):
    from hf_arch.conversion.native_export import native_moe_state

    source = _source("qwen3_moe")
    model_type, _, state = native_moe_state(moe_from_native(source))
    assert model_type == "qwen3_moe"
    for name, tensor in source.state_dict().items():
        assert torch.equal(state[name], tensor), name


def test_moe_sources_take_only_the_native_import(random_source):
    source = _source("mixtral")
    with pytest.raises(ValueError, match="method='native'"):
        refactor_moe(source, MoERefactorOptions(method="upcycle"))
    with pytest.raises(ValueError, match="do not apply: experts, split"):
        refactor_moe(source, MoERefactorOptions(method="native", experts=4, split="random", zero_experts=1))
    with pytest.raises(ValueError, match="already a Mixture of Experts"):
        insert_gates(source)
    with pytest.raises(ValueError, match="'llama'"):
        moe_from_native(random_source("llama"))


def test_convert_cli_path_imports_a_saved_qwen3_moe(tmp_path):
    src = tmp_path / "qwen3moe"
    _source("qwen3_moe").save_pretrained(src)
    result = convert(src, tmp_path / "moe", to="moe", method="native", verify_tokens=24)
    assert result.max_abs_logit_diff <= 1e-5 and result.record["source_model_type"] == "qwen3_moe"
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "moe", dtype=torch.float32).eval()
    assert _max_diff(AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval(), reloaded) <= 1e-5


@pytest.mark.parametrize("name, options", [
    ("mixtral", dict(router="tempered_topk", zero_experts=1, copy_experts=1)),
    ("qwen3_moe_unnormalised", dict(zero_experts=2)),  # the new experts' softmax mass below fp32 rounding
    ("mixtral", dict(pool=True)),
    ("qwen3_moe_unnormalised", dict(pool=True, copy_experts=1)),
])
def test_reshaped_imports_keep_the_function(name, options):
    """MoE++ zero / copy experts, a UniPool pool and the tempered router on an imported MoE: exact at import, the
    new experts (and other layers' pool slices) unreachable until training moves the routers."""
    source = _source(name)
    target = refactor_moe(source, MoERefactorOptions(method="native", **options))
    config = target.config
    assert config.moe_zero_experts == options.get("zero_experts", 0)
    assert config.moe_copy_experts == options.get("copy_experts", 0)
    assert (config.moe_expert_pool == "global") == options.get("pool", False)
    assert _max_diff(source, target) <= 1e-5
    with torch.no_grad():
        prompt = torch.tensor([[1, 5, 9, 3]])
        assert torch.equal(target.generate(prompt, max_new_tokens=8, do_sample=False),
                           source.generate(prompt, max_new_tokens=8, do_sample=False))


@pytest.mark.parametrize("name, options, message", [
    ("qwen3_moe_unnormalised", dict(router="tempered_topk"), "norm_topk_prob=False"),
    ("qwen2_moe", dict(pool=True), "dense layers \\[0, 2\\]"),
    ("mixtral", dict(router="sigmoid_topk"), "keeps its function only"),
])
def test_reshaping_that_would_change_the_model_is_refused(name, options, message):
    with pytest.raises(ValueError, match=message):
        refactor_moe(_source(name), MoERefactorOptions(method="native", **options))
