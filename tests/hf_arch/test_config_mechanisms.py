"""A config refuses options of mechanisms it does not build, and a variant refuses another variant's mechanism.

Every field that only one mechanism reads is listed with that mechanism in ``configuration._MECHANISM_OPTIONS``; each
is tried here away from its default with the mechanism off (refused, naming the field and the config class) and on
(accepted). Defaults are the config class's own, and saved configs (every field at its default) keep loading.
"""

from __future__ import annotations

import re

import pytest
from transformers import AutoConfig

import hf_arch
from hf_arch.configuration import _MECHANISM_OPTIONS, HfArchConfig, _router_options
from hf_arch.models import MOE_PRESETS

TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
LINEAR = dict(layer_types=["linear_attention"] * 2)
MOE = dict(mlp_layer_types=["sparse"] * 2)

# mechanism -> (fields set so that it is off, fields that turn it on)
SWITCHES = {
    "the attention output gate": ({}, dict(attn_output_gate="headwise")),
    "a gate bias": (dict(attn_output_gate="headwise"), dict(attn_output_gate="headwise", attn_output_gate_bias=True)),
    "Cubit's kernel ridge regression": ({}, dict(attn_score_function="krr")),
    "affine-scaled attention": ({}, dict(attn_affine=True)),
    "a MoVE value bank": ({}, dict(move_num_slots=4)),
    "Grouped Differential Attention": ({}, dict(diff_attn_noise_heads=2)),
    "Simulated Attention Score": ({}, dict(sas_num_heads=8)),
    "GeoNorm": ({}, dict(residual_update="geodesic")),
    "learned sparse attention": ({}, dict(sparse_attn_method="seer")),
    "SeerAttention block gates": (dict(sparse_attn_method="flux"), dict(sparse_attn_method="seer")),
    "Flux layer routers": (dict(sparse_attn_method="seer"), dict(sparse_attn_method="flux")),
    "GLA / Gated DeltaNet layers": ({}, LINEAR),
    "an intra-layer hybrid": (LINEAR, dict(LINEAR, linear_attn_hybrid="liger", sliding_window=8)),
    "STILL's token selection": (dict(LINEAR, linear_attn_hybrid="lolcats", linear_attn_feature_map="hedgehog",
                                     linear_attn_normalize=True, sliding_window=8),
                                dict(LINEAR, linear_attn_hybrid="still", linear_attn_feature_map="hedgehog",
                                     linear_attn_normalize=True, sliding_window=16)),
    "GLA's low-rank forget gate": (dict(LINEAR, linear_attn_gate="scalar"), LINEAR),
    "a GLA or key-pooled forget gate": (dict(LINEAR, linear_attn_type="gated_deltanet"), LINEAR),
    "Mixture-of-Experts layers": ({}, MOE),
    "a shared expert": (MOE, dict(MOE, num_shared_experts=1)),
    "a router that reads moe_norm_topk_prob": (dict(MOE, moe_router="relu_rmsnorm"), MOE),
    "moe_router 'norm_router'": (MOE, dict(MOE, moe_router="norm_router")),
    "moe_router 'sinkhorn'": (MOE, dict(MOE, moe_router="sinkhorn")),
    "moe_router 'stochastic'": (MOE, dict(MOE, moe_router="stochastic", moe_load_balance_coef=0.0)),
    "moe_router 'activation_dense_to_sparse'": (MOE, dict(MOE, moe_router="activation_dense_to_sparse")),
    "moe_router 'dynamic_topk'": (MOE, dict(MOE, moe_router="dynamic_topk")),
    "moe_router 'pre_gated'": (MOE, dict(MOE, moe_router="pre_gated")),
    "a per-layer expert capacity schedule": (MOE, dict(MOE, moe_capacity_schedule="descending")),
    "a global expert pool": (MOE, dict(MOE, moe_expert_pool="global")),
    "zero-computation experts": (MOE, dict(MOE, moe_zero_experts=1)),
}
# field -> a value away from its default, and what else that value needs once the mechanism is on
OPTION_VALUES = {
    "attn_output_gate_bias": (True, {}), "attn_output_gate_rank": (4, {}), "attn_output_gate_scale": (2.0, {}),
    "attn_output_gate_init": ("zeros", {}), "attn_output_gate_lr_scale": (3.0, {}),
    "attn_output_gate_bias_init": (1.0, {}),
    "krr_ridge": (2.0, {}), "krr_temperature": (4.0, {}), "krr_value_range": (None, {}),
    "attn_affine_init": ("normal", {}), "move_init": ("normal", {}),
    "diff_attn_lambda_init": (0.0, {}), "diff_attn_head_norm": (False, {}),
    "sas_qk_dim": (16, {}),
    "geonorm_step_init": (0.5, {}), "geonorm_layer_decay": (0.5, {}),
    "sparse_attn_block_size": (32, {}), "sparse_attn_gate_dim": (4, {}), "sparse_attn_selection": ("topk", {}),
    "sparse_attn_threshold": (0.01, {}), "sparse_attn_topk": (4, {}), "sparse_attn_token_budget": (256, {}),
    "sparse_attn_router_hidden": (32, {}), "sparse_attn_router_bias": (1.0, {}), "sparse_attn_sink_blocks": (2, {}),
    "sparse_attn_window_blocks": (2, {}), "sparse_attn_gumbel_tau": (0.5, {}),
    "sparse_attn_target_sparsity": (0.3, {}), "sparse_attn_lagrangian_lr_scale": (5.0, {}),
    "linear_attn_type": ("gated_deltanet", {}), "linear_attn_gate": ("scalar", {}),
    "linear_attn_gate_low_rank_dim": (8, {}), "linear_attn_gate_normalizer": (8.0, {}),
    "linear_attn_conv_size": (4, {}), "linear_attn_qk_norm": ("l2", {}), "linear_attn_output_norm": ("rmsnorm", {}),
    "linear_attn_use_rope": (True, {}),
    "linear_attn_hybrid": ("liger", dict(sliding_window=8)),
    "linear_attn_mix_weights": ([0.3, 0.7], dict(linear_attn_hybrid="liger", sliding_window=8)),
    "linear_attn_num_sinks": (2, dict(linear_attn_hybrid="lizard", sliding_window=8)),
    "linear_attn_feature_map": ("softmax", {}),
    "linear_attn_normalize": (True, dict(linear_attn_feature_map="softmax")),
    "linear_attn_selection_block": (4, dict(linear_attn_hybrid="still", linear_attn_feature_map="hedgehog",
                                            linear_attn_normalize=True, sliding_window=8)),
    "linear_attn_selection_topk": (1, dict(linear_attn_hybrid="still", linear_attn_feature_map="hedgehog",
                                           linear_attn_normalize=True, sliding_window=16)),
    "num_experts": (4, {}), "num_experts_per_tok": (1, {}), "moe_intermediate_size": (32, {}),
    "num_shared_experts": (1, {}), "shared_expert_intermediate_size": (16, dict(num_shared_experts=1)),
    "shared_expert_gate": (True, dict(num_shared_experts=1)), "moe_router": ("sigmoid_topk", {}),
    "moe_norm_topk_prob": (False, {}), "moe_routed_scale": (2.0, {}),
    "moe_norm_router_scale": (5.0, dict(moe_router="norm_router")), "moe_zero_experts": (1, {}),
    "moe_copy_experts": (1, {}), "moe_constant_experts": (1, {}), "moe_gating_residual": (True, {}),
    "moe_router_bias": (True, {}), "moe_expert_pool": ("global", {}),
    "moe_pool_size": (16, dict(moe_expert_pool="global")), "moe_load_balance_coef": (0.1, {}),
    "moe_load_balance_scope": ("pool", dict(moe_expert_pool="global")),
    "moe_zc_balance_weight": (0.5, dict(moe_zero_experts=1)), "moe_z_loss_coef": (0.1, {}),
    "moe_tls_coef": (0.1, dict(moe_router="relu_rmsnorm")), "moe_cls_coef": (0.1, dict(moe_router="relu_rmsnorm")),
    "moe_cls_chunk_size": (4, {}), "output_router_logits": (True, {}),
    "moe_sinkhorn_iterations": (5, dict(moe_router="sinkhorn")), "moe_sinkhorn_imbalance": (2.0, dict(moe_router="sinkhorn")),
    "moe_consistency_coef": (0.5, dict(moe_router="stochastic", moe_load_balance_coef=0.0)),
    "moe_router_activation": ("relu", dict(moe_router="activation_dense_to_sparse")),
    "moe_router_temperature": (2.0, dict(moe_router="activation_dense_to_sparse")),
    "moe_router_threshold": (0.2, dict(moe_router="activation_dense_to_sparse")),
    "moe_dynamic_k": ("complexity", dict(moe_router="dynamic_topk")),
    "moe_dynamic_threshold": (0.8, dict(moe_router="dynamic_topk")),
    "moe_pre_gate_hidden": (64, dict(moe_router="pre_gated")),
    "moe_capacity_schedule": ("ascending", {}), "moe_capacity_min": (2, dict(moe_capacity_schedule="ascending")),
}


def _switch(label: str):
    return next(SWITCHES[key] for key in SWITCHES if label.startswith(key))


MECHANISMS = [*_MECHANISM_OPTIONS, *_router_options()]
CASES = [(label, field) for label, _, fields in MECHANISMS for field in fields]


def test_every_mechanism_and_option_is_covered():
    for label, _, _ in MECHANISMS:
        _switch(label)  # StopIteration: a new mechanism without a row in SWITCHES
    assert {field for _, field in CASES} <= set(OPTION_VALUES)


@pytest.mark.parametrize("label, field", CASES, ids=[f"{field}-off:{label.split(' (')[0]}" for label, field in CASES])
def test_an_option_of_a_mechanism_that_is_off_is_refused_and_accepted_once_on(label, field):
    off, on = _switch(label)
    value, needs = OPTION_VALUES[field]
    with pytest.raises(ValueError, match=rf"^HfArchConfig \(hfa_base\): {field}=.* is an option of") as err:
        HfArchConfig(**TINY, **{**off, field: value})
    assert label in str(err.value)
    config = HfArchConfig(**TINY, **{**on, **needs, field: value})
    assert getattr(config, field) == value


@pytest.mark.parametrize("make, field, variant", [
    (lambda: hf_arch.SASoftmaxConfig(attn_score_function="krr", **TINY), "attn_score_function", "SASoftmaxConfig"),
    (lambda: hf_arch.CubitConfig(diff_attn_lambda_init=0.0, **TINY), "diff_attn_lambda_init", "CubitConfig"),
    (lambda: hf_arch.CubitConfig(attn_score_function="sa_softmax", **TINY), "attn_score_function", "CubitConfig"),
    (lambda: hf_arch.GatedAttentionConfig(krr_ridge=2.0, **TINY), "krr_ridge", "GatedAttentionConfig"),
    (lambda: hf_arch.SASoftmaxConfig(krr_temperature=2.0, **TINY), "krr_temperature", "SASoftmaxConfig"),
    (lambda: hf_arch.DiffAttentionConfig(sas_qk_dim=16, **TINY), "sas_qk_dim", "DiffAttentionConfig"),
    (lambda: hf_arch.MoVEConfig(linear_attn_conv_size=4, **TINY), "linear_attn_conv_size", "MoVEConfig"),
    (lambda: hf_arch.GLAConfig(num_experts=4, **TINY), "num_experts", "GLAConfig"),
    (lambda: hf_arch.MoEConfig(moe_norm_router_scale=5.0, **TINY), "moe_norm_router_scale", "MoEConfig"),
    (lambda: hf_arch.SparseAttentionConfig(sparse_attn_router_hidden=32, **TINY), "sparse_attn_router_hidden",
     "SparseAttentionConfig"),
    (lambda: hf_arch.GeoNormConfig(attn_affine_init="normal", **TINY), "attn_affine_init", "GeoNormConfig"),
    (lambda: hf_arch.GatedDeltaNetConfig(layer_types=["full_attention"] * 2, linear_attn_conv_size=2, **TINY),
     "linear_attn_conv_size", "GatedDeltaNetConfig"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_variant_configs_refuse_other_mechanisms_naming_field_and_variant(make, field, variant):
    with pytest.raises(ValueError, match=re.escape(variant)) as err:
        make()
    assert field in str(err.value)


def test_sa_softmax_names_where_krr_belongs():
    with pytest.raises(ValueError, match=r"'krr' is Cubit's kernel ridge regression: use CubitConfig"):
        hf_arch.SASoftmaxConfig(attn_score_function="krr", **TINY)
    assert hf_arch.SASoftmaxConfig(attn_score_function="sa_softmax", **TINY).attn_score_function == "sa_softmax"


@pytest.mark.parametrize("make, field", [
    (lambda: hf_arch.GLAConfig(attn_output_gate="headwise", **TINY), "attn_output_gate"),
    (lambda: hf_arch.GatedDeltaNetConfig(attn_score_function="krr", **TINY), "attn_score_function"),
    (lambda: hf_arch.GLAConfig(move_num_slots=4, **TINY), "move_num_slots"),
    (lambda: hf_arch.SASoftmaxConfig(**LINEAR, **TINY), "attn_score_function"),
    (lambda: hf_arch.DiffAttentionConfig(**LINEAR, **TINY), "diff_attn_noise_heads"),
])
def test_attention_mechanisms_without_attention_layers_are_refused(make, field):
    with pytest.raises(ValueError, match=rf"{field}=.* acts on softmax attention mixers and none of this config.s token mixers .* builds it"):
        make()


def test_compositions_and_variant_defaults_are_accepted():
    hf_arch.GatedAttentionConfig(diff_attn_noise_heads=2, diff_attn_lambda_init=0.5, **TINY)
    hf_arch.DiffAttentionConfig(attn_output_gate="headwise", attn_output_gate_scale=2.0, **TINY)
    hf_arch.GatedDeltaNetConfig(mlp_layer_types=["sparse", "dense"], num_experts=4, **TINY)
    hf_arch.GLAConfig(full_attention_layers=[1], attn_output_gate="headwise", **TINY)  # the gate on layer 1
    # GatedDeltaNetConfig's own defaults (conv 4, l2 q/k norm) are defaults even where no linear layer reads them
    hf_arch.GatedDeltaNetConfig(layer_types=["full_attention"] * 2, **TINY)
    for preset in MOE_PRESETS:
        hf_arch.MoEConfig(moe_preset=preset, **TINY)
    # a Llama-family field transformers sets on any config that has it (its common tests do, then save and reload)
    hf_arch.GatedAttentionConfig(sliding_window=2, **TINY)


COMPOSED = {
    "gated+noise": lambda: hf_arch.GatedAttentionConfig(diff_attn_noise_heads=2, **TINY),
    "cubit": lambda: hf_arch.CubitConfig(krr_value_range=1.0, **TINY),
    "gdn hybrid+moe": lambda: hf_arch.GatedDeltaNetConfig(linear_to_full_ratio=1, moe_sparse_step=2, **TINY),
    "gla lizard": lambda: hf_arch.GLAConfig(linear_attn_hybrid="lizard", linear_attn_num_sinks=2, sliding_window=8,
                                            **TINY),
    "unipool": lambda: hf_arch.MoEConfig(moe_preset="unipool", **TINY),
    "qwen_moe": lambda: hf_arch.MoEConfig(moe_preset="qwen_moe", **TINY),
    "flux": lambda: hf_arch.SparseAttentionConfig(sparse_attn_method="flux", **TINY),
    "sas": lambda: hf_arch.SASConfig(**TINY),
    "dense, own FFN width": lambda: hf_arch.AffineAttentionConfig(**{**TINY, "intermediate_size": 96}),
}


@pytest.mark.parametrize("name", sorted(COMPOSED))
def test_saved_configs_with_every_field_at_its_default_keep_loading(name, tmp_path):
    config = COMPOSED[name]()
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    strip = lambda d: {k: v for k, v in d.items() if k != "_name_or_path"}  # noqa: E731
    assert type(loaded) is type(config) and strip(loaded.to_dict()) == strip(config.to_dict())
    # derived fields (moe_intermediate_size, moe_pool_size, …) are stored; loading them is not "setting" them
    assert strip(type(config).from_dict(config.to_dict()).to_dict()) == strip(config.to_dict())
