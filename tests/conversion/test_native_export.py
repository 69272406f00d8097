"""Native export: MoE models written as transformers' own mixtral / qwen2_moe, checked in a process without hf_arch."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from hf_arch import MoEConfig
from hf_arch.cli import main
from hf_arch.conversion.api import CONVERSIONS, conversion_options
from hf_arch.conversion.native_export import (
    RECORD_FILE,
    NativeExportError,
    export_native,
    native_moe_state,
    native_state,
)

from .conftest import SOURCE_DIMS


def _partition(source, **options):
    ids = torch.randint(0, SOURCE_DIMS["vocab_size"], (8, 64), generator=torch.Generator().manual_seed(0))
    opts = {**dict(method="partition", experts=4, top_k=2, split="random", router_distill_steps=0), **options}
    model = CONVERSIONS["moe"].convert(source, conversion_options("moe", **opts), calibration_ids=ids).eval()
    _as_if_trained(model)
    return model


def _as_if_trained(model, seed=1):
    """Away from the conversion's exact init: temperatures and router rows that matter, as after training."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("temperature"):
                param.fill_(0.7)
            elif name.endswith(("router.weight", "shared_expert_gate.weight")):
                param.add_(torch.randn(param.shape, generator=gen))


@pytest.mark.parametrize("family, shared, expected", [
    ("llama", True, "qwen2_moe"), ("llama", False, "mixtral"), ("qwen2", False, "qwen2_moe"),
    ("llama3_rope", True, "qwen2_moe"), ("qwen3", False, "qwen3_moe")])
def test_partitions_export_exactly(random_source, tmp_path, family, shared, expected):
    model = _partition(random_source(family), **({} if shared else {"shared_neurons": 0}))
    record = export_native(model, tmp_path / "native")
    assert record["model_type"] == record["loaded_as"] == expected
    assert record["max_abs_logit_diff"] <= 1e-5 and record["generation_agrees"]
    assert json.loads((tmp_path / "native" / RECORD_FILE).read_text())["model_type"] == expected
    assert f"`{expected}`" in (tmp_path / "native" / "README.md").read_text()


def test_dense_layers_gated_shared_expert_and_unnormalised_router(tmp_path):
    config = MoEConfig(vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                       num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, num_experts=4,
                       num_experts_per_tok=2, mlp_layer_types=["dense", "sparse", "sparse"], moe_preset="qwen_moe",
                       moe_norm_topk_prob=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    _as_if_trained(model)
    target, native, _ = native_moe_state(model)
    assert target == "qwen2_moe" and native.mlp_only_layers == [0] and native.norm_topk_prob is False
    record = export_native(model, tmp_path / "native")
    assert record["max_abs_logit_diff"] <= 1e-5 and record["generation_agrees"]


def test_export_from_a_directory_copies_tokenizer_files_and_refuses_to_overwrite(random_source, tmp_path, capsys):
    model = _partition(random_source("llama"), shared_neurons=0)
    model.save_pretrained(tmp_path / "moe")
    (tmp_path / "moe" / "tokenizer_config.json").write_text("{}")
    assert main(["export", str(tmp_path / "moe"), str(tmp_path / "native"), "--native"]) == 0
    assert "as mixtral" in capsys.readouterr().out
    assert (tmp_path / "native" / "tokenizer_config.json").is_file()
    with pytest.raises(FileExistsError, match="--overwrite"):
        export_native(tmp_path / "moe", tmp_path / "native", check=False)


@pytest.mark.parametrize("change, message", [
    (dict(attn_output_gate="headwise"), "config field attn_output_gate"),
    (dict(moe_preset="moe_plus_plus"), "config field moe_"),
    (dict(moe_router="sigmoid_topk"), "moe_router='sigmoid_topk'"),
    (dict(layer_types=["full_attention", "sliding_attention"], sliding_window=4), "layer 1: sliding_attention"),
])
def test_what_has_no_native_form_is_refused_by_name(tmp_path, change, message):
    config = MoEConfig(vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, num_experts=4,
                       num_experts_per_tok=2, **change)
    model = AutoModelForCausalLM.from_config(config).eval()
    with pytest.raises(NativeExportError, match=message):
        export_native(model, tmp_path / "native")
    assert not (tmp_path / "native").exists() and not list(tmp_path.iterdir())


def test_zero_temperature_router_is_refused_unless_every_expert_is_active(random_source, tmp_path):
    model = _partition(random_source("llama"))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("temperature"):
                param.zero_()
    with pytest.raises(NativeExportError, match="layer 0: router temperature 0"):
        native_moe_state(model)
    every = _partition(random_source("llama"), top_k=4)
    with torch.no_grad():
        for name, param in every.named_parameters():
            if name.endswith("temperature"):
                param.zero_()
    assert native_moe_state(every)[0] == "qwen2_moe"


def test_qwen3_with_a_shared_expert_is_refused(random_source):
    with pytest.raises(NativeExportError, match="qwen3_moe .* has no shared expert"):
        native_moe_state(_partition(random_source("qwen3")))


def test_non_moe_models_are_refused(random_source):
    gated = CONVERSIONS["gated_attention"].convert(random_source("llama"), conversion_options("gated_attention"))
    with pytest.raises(NativeExportError, match="model_type 'hfa_gated_attention'"):
        native_state(gated)


def _gated_deltanet(source, **options):
    model = CONVERSIONS["gated_deltanet"].convert(source, conversion_options("gated_deltanet", method="mamba_init",
                                                                              **options)).eval()
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():  # norms away from 1: the zero-centred (1 + w) mapping must be right
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(0.1 * torch.randn(param.shape, generator=gen))
    return model


def test_all_gated_deltanet_exports_as_qwen3_next(random_source, tmp_path):
    """GQA source (4 q heads, 2 kv heads): k/v rows repeated per q head; fused per-head projections; (1 + w) norms."""
    record = export_native(_gated_deltanet(random_source("llama")), tmp_path / "native")
    assert record["model_type"] == record["loaded_as"] == "qwen3_next"
    assert record["max_abs_logit_diff"] <= 1e-5
    # transformers 5.25 cannot generate with a cache from a qwen3_next without attention layers: recorded, not hidden
    assert record["generation_agrees"] in (True, None)
    if record["generation_agrees"] is None:
        assert "get_mask_sizes" in record["generation_error_in_transformers"]
        assert "could not run" in (tmp_path / "native" / "README.md").read_text()


def test_gated_deltanet_with_a_kept_attention_layer_is_refused(random_source):
    model = _gated_deltanet(random_source("llama"), keep_full_attention=[1])
    with pytest.raises(NativeExportError, match="layer 1: full_attention"):
        native_state(model)


def test_convert_native_in_one_step(random_source, tmp_path, capsys):
    src = tmp_path / "src"
    random_source("llama").save_pretrained(src)
    # Every expert active with the conversion's exact router init (temperature 0): exportable, and exact.
    code = main(["convert", str(src), str(tmp_path / "native"), "--to", "moe", "--method", "partition",
                 "--experts", "4", "--top-k", "4", "--split", "random", "--shared-neurons", "0",
                 "--router-distill-steps", "0", "--native"])
    assert code == 0 and "as mixtral" in capsys.readouterr().out
    config = json.loads((tmp_path / "native" / "config.json").read_text())
    assert config["model_type"] == "mixtral" and "auto_map" not in config
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging left behind
    # A conversion with no native form is refused after converting, with the reason, and leaves nothing behind.
    assert main(["convert", str(src), str(tmp_path / "other"), "--to", "gated_attention", "--native"]) == 2
    assert "native export covers" in capsys.readouterr().err and not (tmp_path / "other").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    # An all-KDA linearization (mamba_init) is Kimi Linear without MLA layers.
    code = main(["convert", str(src), str(tmp_path / "kimi"), "--to", "kda", "--method", "mamba_init", "--native"])
    assert code == 0 and json.loads((tmp_path / "kimi" / "config.json").read_text())["model_type"] == "kimi_linear"


def _kimi_layout(mixers=("kda", "kda", "kda", "mla"), mla=None, **config):
    import hf_arch

    mla = {"kv_lora_rank": 16, "qk_nope_head_dim": 8, "qk_rope_head_dim": 4, "v_head_dim": 8,
           "latent_norm_eps": 1e-6, **(mla or {})}
    kwargs = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=len(mixers),
                  num_attention_heads=4, num_key_value_heads=config.pop("num_key_value_heads", 4), head_dim=8,
                  token_mixer_types=list(mixers),
                  layer_types=["full_attention" if m == "mla" else "linear_attention" for m in mixers],
                  mixer_options={"mla": mla, **config.pop("mixer_options", {})}, **config)
    torch.manual_seed(0)
    model = hf_arch.KDAForCausalLM(hf_arch.KDAConfig(**kwargs)).eval()
    with torch.no_grad():  # away from the init, so every tensor shows in the comparison
        for name, param in model.named_parameters():
            param.copy_(torch.empty_like(param).uniform_(0, 1.5)) if "A_log" in name else param.add_(
                torch.randn_like(param) * 0.1)
    return model


def test_kda_with_nope_mla_exports_as_kimi_linear(tmp_path):
    record = export_native(_kimi_layout(), tmp_path / "native")
    assert record["model_type"] == record["loaded_as"] == "kimi_linear"
    assert record["max_abs_logit_diff"] <= 1e-5 and record["generation_agrees"]
    card = (tmp_path / "native" / "README.md").read_text()
    assert "`kimi_linear`" in card and "vLLM" in card


@pytest.mark.parametrize("change, message", [
    (dict(mla={"use_rope": True, "qk_rope_head_dim": 8}), "NoPE"),
    (dict(mla={"latent_norm_eps": 1e-5}), "eps 1e-05"),
    (dict(mixer_options={"kda": {"gate_lower_bound": -5.0}}), "gate_lower_bound"),
    (dict(num_key_value_heads=2), "num_key_value_heads=2 with MLA"),
    (dict(mlp_layer_types=["dense", "sparse", "dense", "dense"], num_experts=4), "layer 1: sparse MLP"),
    (dict(mixers=("kda", "gated_deltanet", "kda", "mla"), linear_attn_type="gated_deltanet"),
     "layer 1: GatedDeltaNetAttention"),
])
def test_what_kimi_linear_cannot_express_is_refused(change, message):
    change = dict(change)
    mixers = change.pop("mixers", ("kda", "kda", "kda", "mla"))
    with pytest.raises(NativeExportError, match=message):
        native_state(_kimi_layout(mixers, **change))
