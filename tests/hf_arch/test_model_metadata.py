"""Model metadata (flash / flex support, LoRA targets, new parameters) follows what the config builds, not model_type.

Configs compose: a gated-attention config with differential noise heads, a diff-attention model with an output gate,
GDN + MoE. Everything here is read from the modules (or, for the class flags transformers checks in ``__init__``,
from the config), so each composition gets the union of its mechanisms' metadata.
"""

from __future__ import annotations

import re

import pytest
import torch
from transformers import AutoModelForCausalLM

import hf_arch
from hf_arch.models import (
    CubitForCausalLM,
    DiffAttentionForCausalLM,
    GatedAttentionForCausalLM,
    GLAForCausalLM,
    SASForCausalLM,
    SASoftmaxForCausalLM,
)

TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)


def model(config):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config)


# ------------------------------------------------------------------------------------------ flash / flex attention

NO_KERNELS = {
    "gated+noise": (lambda: hf_arch.GatedAttentionConfig(diff_attn_noise_heads=2, **TINY), "diff_attn_noise_heads"),
    "gated+sa_softmax": (lambda: hf_arch.GatedAttentionConfig(attn_score_function="sa_softmax", **TINY),
                         "attn_score_function='sa_softmax'"),
    "affine+krr": (lambda: hf_arch.AffineAttentionConfig(attn_score_function="krr", **TINY), "attn_score_function='krr'"),
    "move+sas": (lambda: hf_arch.MoVEConfig(move_num_slots=4, sas_num_heads=8, **TINY), "sas_num_heads"),
    "gdn hybrid+noise": (lambda: hf_arch.GatedDeltaNetConfig(linear_to_full_ratio=1, diff_attn_noise_heads=1, **TINY),
                         "diff_attn_noise_heads"),
    "sa_softmax": (lambda: hf_arch.SASoftmaxConfig(**TINY), "attn_score_function"),
    "cubit": (lambda: hf_arch.CubitConfig(**TINY), "attn_score_function='krr'"),
    "diff_attention": (lambda: hf_arch.DiffAttentionConfig(**TINY), "diff_attn_noise_heads"),
    "sas": (lambda: hf_arch.SASConfig(**TINY), "sas_num_heads"),
}


@pytest.mark.parametrize("name", sorted(NO_KERNELS))
def test_flash_and_flex_support_follow_the_config(name):
    make, feature = NO_KERNELS[name]
    m = model(make())
    assert m._supports_flash_attn is False and m._supports_flex_attn is False
    assert m.model._supports_flash_attn is False  # the inner model reads the same config
    assert m._supports_sdpa


@pytest.mark.parametrize("implementation", ["flash_attention_2", "flash_attention_3", "flex_attention"])
@pytest.mark.parametrize("name", sorted(NO_KERNELS))
def test_requesting_flash_or_flex_names_the_feature(name, implementation):
    make, feature = NO_KERNELS[name]
    with pytest.raises(ValueError, match=re.escape(feature)) as err:
        AutoModelForCausalLM.from_config(make(), attn_implementation=implementation)
    assert f"attn_implementation={implementation!r}" in str(err.value)
    m = model(make())
    with pytest.raises(ValueError, match=re.escape(feature)):
        m.set_attn_implementation(implementation)
    assert m.config._attn_implementation == "sdpa"  # unchanged


@pytest.mark.parametrize("config", [
    hf_arch.GatedAttentionConfig(**TINY),
    hf_arch.GatedAttentionConfig(attn_affine=True, move_num_slots=4, **TINY),
    hf_arch.GLAConfig(**TINY),
    hf_arch.MoEConfig(moe_preset="unipool", **TINY),
], ids=["gated", "gated+affine+move", "gla", "moe"])
def test_backend_kernels_stay_available_where_nothing_rules_them_out(config):
    m = model(config)
    assert m._supports_flash_attn is True and m._supports_flex_attn is True
    # Whatever transformers says about flash here (no package, no GPU), it is not our refusal.
    try:
        AutoModelForCausalLM.from_config(config, attn_implementation="flash_attention_2")
    except (ImportError, ValueError) as err:
        assert "cannot run this config's attention" not in str(err)


def test_class_level_flags_are_what_the_default_config_builds():
    assert GatedAttentionForCausalLM._supports_flash_attn is True and GLAForCausalLM._supports_flex_attn is True
    for cls in (SASoftmaxForCausalLM, CubitForCausalLM, DiffAttentionForCausalLM, SASForCausalLM):
        assert cls._supports_flash_attn is False and cls._supports_flex_attn is False, cls
        # No per-variant override left: the answer comes from the config the class builds.
        assert "_supports_flash_attn" not in cls.__mro__[1].__dict__


# --------------------------------------------------------------------------------------- LoRA targets, new params

def _relative(names):
    """Parameter names without the layer prefix: ``self_attn.output_gate.proj.weight``."""
    return {re.sub(r"^model\.layers\.\d+\.", "", n) for n in names}


def test_gated_attention_with_noise_heads_gets_the_noise_projections():
    m = model(hf_arch.GatedAttentionConfig(diff_attn_noise_heads=2, **TINY))
    targets = hf_arch.lora_target_modules(m)
    assert {"noise_q_proj", "noise_k_proj", "output_gate.proj", "q_proj"} <= set(targets)
    new = _relative(hf_arch.new_parameter_names(m))
    assert {"self_attn.differential.noise_q_proj.weight", "self_attn.differential.noise_k_proj.weight",
            "self_attn.differential.noise_lambda", "self_attn.output_gate.proj.weight"} <= new
    # include_new=False leaves out every new projection, whichever variant brought it
    assert not {"noise_q_proj", "noise_k_proj", "output_gate.proj"} & set(hf_arch.lora_target_modules(m, False))


def test_diff_attention_with_an_output_gate_counts_the_gate_as_new():
    m = model(hf_arch.DiffAttentionConfig(attn_output_gate="headwise", **TINY))
    assert "self_attn.output_gate.proj.weight" in _relative(hf_arch.new_parameter_names(m))
    assert {"output_gate.proj", "noise_q_proj", "noise_k_proj"} <= set(hf_arch.lora_target_modules(m))


def test_gdn_with_moe_layers_gets_both_mechanisms():
    m = model(hf_arch.GatedDeltaNetConfig(mlp_layer_types=["sparse", "dense"], **TINY))
    assert {"q_proj", "output_gate_proj", "gate_proj"} <= set(hf_arch.lora_target_modules(m))
    assert hf_arch.lora_target_parameters(m) == ["experts.gate_up_proj", "experts.down_proj"]
    new = _relative(hf_arch.new_parameter_names(m))
    assert {"self_attn.A_log", "self_attn.conv.weight", "mlp.router.weight", "mlp.experts.gate_up_proj"} <= new


COMPOSED = {
    "gated+noise": lambda: hf_arch.GatedAttentionConfig(diff_attn_noise_heads=2, **TINY),
    "diff+gate": lambda: hf_arch.DiffAttentionConfig(attn_output_gate="headwise", **TINY),
    "gdn+moe": lambda: hf_arch.GatedDeltaNetConfig(mlp_layer_types=["sparse", "sparse"], **TINY),
    "moe unipool+gate+move": lambda: hf_arch.MoEConfig(moe_preset="unipool", attn_output_gate="elementwise",
                                                       move_num_slots=4, **TINY),
    "gla lizard+geonorm": lambda: hf_arch.GLAConfig(linear_attn_hybrid="lizard", linear_attn_num_sinks=2,
                                                    sliding_window=8, residual_update="geodesic", **TINY),
    "flux+qwen moe": lambda: hf_arch.SparseAttentionConfig(sparse_attn_method="flux", mlp_layer_types=["sparse"] * 2,
                                                           num_shared_experts=1, shared_expert_gate=True, **TINY),
    "moe++": lambda: hf_arch.MoEConfig(moe_preset="moe_plus_plus", **TINY),
    "sas+gate": lambda: hf_arch.SASConfig(attn_output_gate="headwise", **TINY),
}
# What a Llama-family checkpoint has (a dense FFN also becomes a MoE layer's shared expert): everything else is new.
LLAMA_PARAMETER = re.compile(r"^(model\.embed_tokens|lm_head|model\.norm|model\.layers\.\d+\.(input_layernorm|"
                             r"post_attention_layernorm|self_attn\.(q_proj|k_proj|v_proj|o_proj|q_norm|k_norm)|"
                             r"mlp\.(shared_expert\.)?(gate_proj|up_proj|down_proj)))\.")


@pytest.mark.parametrize("name", sorted(COMPOSED))
def test_metadata_is_the_union_of_the_modules_and_the_same_from_a_config(name):
    config = COMPOSED[name]()
    m = model(config)
    new = set(hf_arch.new_parameter_names(m))
    for param_name, _ in m.named_parameters():  # every parameter is a Llama one or declared new, never both
        assert bool(LLAMA_PARAMETER.match(param_name)) != (param_name in new), param_name
    linears = [n for n, module in m.named_modules() if isinstance(module, torch.nn.Linear)]
    for target in hf_arch.lora_target_modules(m):  # each suffix matches something, and never lm_head
        matched = [n for n in linears if n == target or n.endswith("." + target)]
        assert matched and "lm_head" not in matched, target
    parameters = dict(m.named_parameters())
    for target in hf_arch.lora_target_parameters(m):
        assert any(n.endswith("." + target) and parameters[n].dim() == 3 for n in parameters), target
    # A config reads the same metadata through the model it builds (on the meta device), and is left unchanged.
    before = config.to_dict()
    assert hf_arch.lora_target_modules(config) == hf_arch.lora_target_modules(m)
    assert hf_arch.lora_target_modules(config, include_new=False) == hf_arch.lora_target_modules(m, include_new=False)
    assert hf_arch.lora_target_parameters(config) == hf_arch.lora_target_parameters(m)
    assert hf_arch.new_parameter_names(config) == hf_arch.new_parameter_names(m)
    assert config.to_dict() == before


def test_peft_trains_the_union_of_targets_on_a_composed_model():
    from peft import LoraConfig, get_peft_model

    m = model(hf_arch.GatedAttentionConfig(diff_attn_noise_heads=2, **TINY))
    peft_model = get_peft_model(m, LoraConfig(r=2, lora_alpha=4, target_modules=hf_arch.lora_target_modules(m)))
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert any("noise_q_proj.lora_A" in n for n in trainable) and any("output_gate.proj.lora_A" in n for n in trainable)


# What the per-model_type tables gave for each plain variant (suffixes; new parameters without the layer prefix):
# the module-declared metadata must give the same.
PLAIN = {
    "gated_attention": (hf_arch.GatedAttentionConfig, {}, {"output_gate.proj"}, set(),
                        {"self_attn.output_gate.proj.weight"}),
    "gla": (hf_arch.GLAConfig, {}, {"output_gate_proj"}, set(),
            {"self_attn.forget_proj.0.weight", "self_attn.forget_proj.1.weight", "self_attn.forget_proj.1.bias",
             "self_attn.out_norm.weight", "self_attn.output_gate_proj.weight"}),
    "gated_deltanet": (hf_arch.GatedDeltaNetConfig, {}, {"output_gate_proj"}, set(),
                       {"self_attn.A_log", "self_attn.dt_bias", "self_attn.conv.weight", "self_attn.decay_proj.weight",
                        "self_attn.beta_proj.weight", "self_attn.out_norm.weight",
                        "self_attn.output_gate_proj.weight"}),
    "moe": (hf_arch.MoEConfig, {}, set(), {"experts.gate_up_proj", "experts.down_proj"},
            {"mlp.router.weight", "mlp.experts.gate_up_proj", "mlp.experts.down_proj"}),
    "sa_softmax": (hf_arch.SASoftmaxConfig, {}, set(), set(), set()),
    "affine_attention": (hf_arch.AffineAttentionConfig, {}, set(), set(), {"self_attn.affine.weight"}),
    "move": (hf_arch.MoVEConfig, {"move_num_slots": 4}, set(), set(),
             {"self_attn.value_gate.router", "self_attn.value_gate.scale", "model.value_bank.weight"}),
    "diff_attention": (hf_arch.DiffAttentionConfig, {}, {"noise_q_proj", "noise_k_proj"}, set(),
                       {"self_attn.differential.noise_q_proj.weight", "self_attn.differential.noise_k_proj.weight",
                        "self_attn.differential.noise_lambda", "self_attn.differential.head_norm.weight"}),
    "cubit": (hf_arch.CubitConfig, {}, set(), set(), set()),
    "sas": (hf_arch.SASConfig, {}, set(), set(),
            {f"self_attn.simulated.{p}" for p in ("query_heads", "key_heads", "value_heads", "query_features",
                                                  "key_features", "aggregate")}),
    "geonorm": (hf_arch.GeoNormConfig, {}, set(), set(), {"attn_update.step", "mlp_update.step"}),
    "sparse_attention": (hf_arch.SparseAttentionConfig, {}, set(), set(),
                         {"self_attn.block_gate.q_map", "self_attn.block_gate.k_map"}),
}
DENSE = {"gate_proj", "up_proj", "down_proj"}


@pytest.mark.parametrize("name", sorted(PLAIN))
def test_plain_variants_keep_their_metadata(name):
    config_class, extra, own_targets, parameters, new = PLAIN[name]
    m = model(config_class(**TINY, **extra))
    attention = {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert set(hf_arch.lora_target_modules(m)) == attention | own_targets | (set() if name == "moe" else DENSE)
    assert set(hf_arch.lora_target_parameters(m)) == parameters
    assert _relative(hf_arch.new_parameter_names(m)) == new
