"""The public extension API: the README's token-mixer example, run verbatim as a module of another package, gets
AutoModel, generate with a cache, save / load, LoRA targets, initialisation and the remote-code export without any
hf-arch file edited; the registries refuse what they cannot build, by name."""

from __future__ import annotations

import importlib
import importlib.util
import math
import re
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import hf_arch
from hf_arch.layers.mixer_registry import CHANNEL_MIXERS, TOKEN_MIXERS, register_token_mixer

README = Path(__file__).resolve().parents[2] / "README.md"
TINY = dict(vocab_size=128, hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2,
            num_hidden_layers=4, max_position_embeddings=64, pad_token_id=0)
EXAMPLE_MODULE = "my_mixers_readme_example"


def readme_example() -> str:
    text = README.read_text(encoding="utf-8")
    block = re.search(r"<!-- mixer-extension-example -->\s*```python\n(.*?)```\s*<!-- /mixer-extension-example -->",
                      text, re.S)
    assert block, "README.md lost its mixer-extension example block"
    return block.group(1)


@pytest.fixture(scope="module")
def example_module(tmp_path_factory):
    """The README block written out as a module of a package that is not hf-arch, and imported."""
    root = tmp_path_factory.mktemp("extension")
    (root / f"{EXAMPLE_MODULE}.py").write_text(readme_example(), encoding="utf-8")
    sys.path.insert(0, str(root))
    try:
        module = importlib.import_module(EXAMPLE_MODULE)
        yield module
    finally:
        sys.path.remove(str(root))


def cosine_config(**overrides):
    kwargs = dict(TINY, token_mixer_types=["cosine_attention", "attention"] * 2,
                  mixer_options={"cosine_attention": {"init_scale": 12.0}})
    kwargs.update(overrides)
    return hf_arch.HybridConfig(**kwargs)


def test_readme_mixer_builds_through_auto_classes(example_module):
    assert TOKEN_MIXERS["cosine_attention"] is example_module.CosineAttention
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cosine_config()).eval()
    assert type(model).__name__ == "HybridForCausalLM"
    kinds = [type(layer.self_attn).__name__ for layer in model.model.layers]
    assert kinds == ["CosineAttention", "HfArchAttention"] * 2
    assert model.config.layer_types == ["full_attention"] * 4  # from the mixer's declared layer_types
    # The one init path ran the mixer's own init_parameters, with its options.
    scale = model.model.layers[0].self_attn.log_scale
    torch.testing.assert_close(scale, torch.full_like(scale, math.log(12.0)))
    # LoRA targets and new parameters are the union over the modules built.
    assert {"q_proj", "k_proj", "v_proj", "o_proj"} <= set(hf_arch.lora_target_modules(model))
    assert any(name.endswith("log_scale") for name in hf_arch.new_parameter_names(model))


def test_readme_mixer_generates_with_cache_and_left_padding(example_module):
    torch.manual_seed(0)
    model = hf_arch.HybridForCausalLM(cosine_config()).eval()
    ids = torch.randint(1, 61, (2, 7))
    mask = torch.ones_like(ids)
    ids[0, :3], mask[0, :3] = 0, 0  # left padding
    kwargs = dict(attention_mask=mask, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cached = model.generate(ids, **kwargs)
        uncached = model.generate(ids, use_cache=False, **kwargs)
    assert torch.equal(cached, uncached)
    # The unpadded row alone decodes the same tokens (padding does not leak into the real tokens).
    with torch.no_grad():
        alone = model.generate(ids[:1, 3:], attention_mask=mask[:1, 3:], **{k: v for k, v in kwargs.items()
                                                                          if k != "attention_mask"})
    assert torch.equal(alone[0, 4:], cached[0, 7:])


def test_readme_mixer_saves_loads_and_exports_remote_code(example_module, tmp_path):
    torch.manual_seed(0)
    model = hf_arch.HybridForCausalLM(cosine_config()).eval()
    with torch.no_grad():
        model.model.layers[0].self_attn.log_scale.add_(torch.linspace(-0.3, 0.3, 4))  # a trained value survives
    model.save_pretrained(tmp_path / "saved")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved").eval()
    ids = torch.randint(1, 61, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=1e-6)
    # save_pretrained wrote the flat remote code, with the other package's mixer in it.
    modeling = (tmp_path / "saved" / "modeling_hf_arch.py").read_text()
    assert "class CosineAttention(HfArchAttention)" in modeling and '@register_token_mixer("cosine_attention")' in modeling
    assert EXAMPLE_MODULE in modeling  # its section header names the module it came from
    remote_tests = _load_sibling("test_remote_code")
    remote_tests._assert_hidden_load_matches(model, remote_tests._run_hidden(tmp_path, tmp_path / "saved"))


def test_other_checkpoints_do_not_carry_an_unused_extension(example_module, tmp_path):
    model = hf_arch.HybridForCausalLM(hf_arch.HybridConfig(**TINY))
    model.save_pretrained(tmp_path / "plain")
    assert "CosineAttention" not in (tmp_path / "plain" / "modeling_hf_arch.py").read_text()


def test_registries_refuse_what_they_cannot_build(example_module):
    typo = ["cosine_atention", "attention"] * 2
    with pytest.raises(ValueError, match=r"token_mixer_types has unregistered token mixers \['cosine_atention'\]"):
        cosine_config(token_mixer_types=typo, mixer_options=None)  # its layer types cannot be derived
    # A saved config (layer_types given) may name a mixer registered later (remote code): the build names it.
    with pytest.raises(ValueError, match=r"token mixer 'cosine_atention' is not registered; registered: \[.*'attention'"):
        hf_arch.HybridForCausalLM(cosine_config(token_mixer_types=typo, layer_types=["full_attention"] * 4,
                                                mixer_options=None))
    with pytest.raises(ValueError, match=r"channel mixer 'moe' \(layer 0\) is not registered; registered: "
                                         r"\[.*'dense'.*'sparse'"):
        hf_arch.HybridForCausalLM(hf_arch.HybridConfig(**TINY, channel_mixer_types=["moe"] + ["dense"] * 3))
    with pytest.raises(ValueError, match=r"mlp_layer_types has unsupported entries \['moe'\]"):
        hf_arch.HybridConfig(**TINY, mlp_layer_types=["moe"] + ["dense"] * 3)
    with pytest.raises(ValueError, match=r"layer 0 has channel mixer 'sparse', a 'sparse' layer, but mlp_layer_types"):
        hf_arch.HybridConfig(**TINY, channel_mixer_types=["sparse"] * 4, mlp_layer_types=["dense"] * 4)
    with pytest.raises(ValueError, match=r"mixer_options\['cosine_attention'\] has unknown options \['scale'\]; "
                                         r"CosineOptions takes \['init_scale'\]"):
        hf_arch.HybridForCausalLM(cosine_config(mixer_options={"cosine_attention": {"scale": 3.0}}))
    with pytest.raises(ValueError, match=r"mixer_options has options for \['mla'\], which no layer uses"):
        cosine_config(mixer_options={"mla": {}})
    with pytest.raises(ValueError, match=r"layer 0 has token mixer 'gla', which sits at layer types "
                                         r"\('linear_attention', 'hybrid_sliding', 'hybrid'\), but layer_types\[0\] is 'full_attention'"):
        hf_arch.HybridConfig(**TINY, token_mixer_types=["gla"] * 4, layer_types=["full_attention"] * 4)
    with pytest.raises(ValueError, match=r"(token_mixer|layer)_types has 3 entries but num_hidden_layers is 4"):
        hf_arch.HybridConfig(**TINY, token_mixer_types=["attention"] * 3)
    with pytest.raises(TypeError, match=r"must declare layer_types"):
        register_token_mixer("no_layer_types")(type("NoLayerTypes", (torch.nn.Module,), {}))
    assert "no_layer_types" not in TOKEN_MIXERS
    with pytest.raises(ValueError, match=r"token mixer 'attention' is already registered with"):
        register_token_mixer("attention")(type("Impostor", (torch.nn.Module,), {"layer_types": ("linear_attention",)}))
    assert set(CHANNEL_MIXERS) >= {"dense", "sparse"}


def test_builtin_layouts_name_their_mixers():
    """Configs without token_mixer_types (every checkpoint saved before it existed) pick the built-in mixers from
    their flat fields; the Kimi-style hybrid of two registered mixers needs only names."""
    assert hf_arch.GLAConfig(**TINY).token_mixer_names() == {"gla"}
    assert hf_arch.GatedDeltaNetConfig(**TINY, full_attention_layers=[3]).token_mixer_names() == {"gated_deltanet",
                                                                                                 "attention"}
    assert hf_arch.SparseAttentionConfig(**TINY).token_mixer_names() == {"sparse_attention"}
    hybrid = hf_arch.HybridConfig(**TINY, token_mixer_types=["gated_deltanet"] * 3 + ["attention"],
                                  linear_attn_type="gated_deltanet")
    assert hybrid.layer_types == ["linear_attention"] * 3 + ["full_attention"]
    assert hf_arch.HybridConfig.from_dict(hybrid.to_dict()).token_mixer_types == hybrid.token_mixer_types


def _load_sibling(name: str):
    """A test module beside this one (the suite runs with --import-mode=importlib: no sys.path entry)."""
    spec = importlib.util.spec_from_file_location(f"_sibling_{name}", Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
