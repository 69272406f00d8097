"""Softmax attention's parts are registries: the built-in scores and features are registered classes the layer
builds from the config alone, and a package outside hf-arch adds a feature and a score function that get AutoModel,
cached generation, save / load, initialisation, the flash / flex verdict and the remote-code export."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import hf_arch
from hf_arch.configuration import ATTENTION_FEATURE_SPECS, ATTENTION_SCORE_SPECS
from hf_arch.layers.attention_registry import ATTENTION_FEATURES, ATTENTION_SCORES, AttentionFeature

TINY = dict(vocab_size=128, hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2,
            num_hidden_layers=2, max_position_embeddings=64, pad_token_id=0)
EXTENSION_MODULE = "my_attention_parts_example"
# A package of its own: a per-head output scale (identity at init) and sigmoid attention (Ramapuram et al. 2024:
# sigmoid(q·k/√d − log n) in place of softmax, n the keys a query attends), each registered by name.
EXTENSION_SOURCE = '''
import torch
from torch import nn

from hf_arch import AttentionFeature, AttentionFeatureSpec, AttentionScoreSpec, register_attention_feature
from hf_arch import register_attention_score
from hf_arch.layers.own_op_scores import OwnOpScore


@register_attention_feature("head_scale")
class HeadScale(AttentionFeature):
    spec = AttentionFeatureSpec(attribute="head_scale", switch="attn_head_scale", off=False,
                                description="a learned per-head output scale (attn_head_scale=True)")
    new_parameters = ("*",)

    def __init__(self, config, layer_idx):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(config.num_attention_heads))

    def init_parameters(self, init):
        init.ones_(self.weight)  # identity: inserting it keeps a model's function

    def adjust_output(self, hidden_states, attn_output, values_seen=None, padding_mask=None):
        return attn_output * self.weight.to(attn_output.dtype)[:, None]


@register_attention_score("sigmoid")
class SigmoidScore(OwnOpScore):
    spec = AttentionScoreSpec(description="sigmoid attention")

    def weight_maps(self, q, k, padding_mask, layer):
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # [B, heads, T / S, D]
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        T, S = q.shape[2], k.shape[2]
        keep = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
        if padding_mask is not None:
            keep = keep & padding_mask[:, None, None, -S:].bool()
        # The bias is −log of the keys each query attends, so a decode step sees what the full forward saw.
        attended = keep.sum(-1, keepdim=True).clamp(min=1)
        logits = q.float() @ k.float().transpose(-1, -2) * layer.scaling - torch.log(attended.float())
        return (torch.sigmoid(logits) * keep).to(q.dtype)

    def op(self, q, k, v, padding_mask, layer):
        weights = self.weight_maps(q, k, padding_mask, layer)
        return (weights @ v.transpose(1, 2).repeat_interleave(weights.shape[1] // v.shape[2], dim=1)).transpose(1, 2)
'''


@pytest.fixture(scope="module")
def extension(tmp_path_factory):
    root = tmp_path_factory.mktemp("attention_parts")
    (root / f"{EXTENSION_MODULE}.py").write_text(EXTENSION_SOURCE, encoding="utf-8")
    sys.path.insert(0, str(root))
    try:
        yield importlib.import_module(EXTENSION_MODULE)
    finally:
        sys.path.remove(str(root))


def test_built_in_parts_are_registered_with_their_config_specs():
    assert set(ATTENTION_SCORES) >= {"softmax", "sa_softmax", "sa_softmax_normalized", "krr"}
    assert set(ATTENTION_SCORES) >= set(ATTENTION_SCORE_SPECS) - {"sigmoid"}
    built_in = {"value_bank", "simulated_heads", "differential", "affine", "output_gate"}
    assert built_in <= set(ATTENTION_FEATURES)
    for name in built_in:
        cls = ATTENTION_FEATURES[name]
        assert issubclass(cls, AttentionFeature) and cls.spec is ATTENTION_FEATURE_SPECS[name]
    # The layer holds each feature under its spec's attribute (checkpoint names), and None where it is off.
    config = hf_arch.GatedAttentionConfig(diff_attn_noise_heads=2, move_num_slots=4, **TINY)
    attention = hf_arch.GatedAttentionForCausalLM(config).model.layers[0].self_attn
    assert attention.feature_attributes == ("value_gate", "differential", "output_gate")
    assert attention.affine is None and attention.simulated is None
    assert attention.attender is attention.differential and attention.head_placer is None
    assert type(attention.score).__name__ == "BackendSoftmaxScore"


def test_features_apply_in_registration_order_and_one_replaces_the_score():
    config = hf_arch.SASConfig(attn_output_gate="headwise", **TINY)
    attention = hf_arch.SASForCausalLM(config).model.layers[0].self_attn
    assert attention.feature_attributes == ("simulated", "output_gate")
    assert attention.head_placer is attention.simulated
    assert attention.scaling == config.sas_qk_dim**-0.5  # the feature sets the score's scale


def _model(config):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def test_an_external_feature_builds_initialises_trains_and_decodes(extension):
    config = hf_arch.GatedAttentionConfig(attn_head_scale=True, **TINY)
    model = _model(config)
    base = _model(hf_arch.GatedAttentionConfig(**TINY))
    layer = model.model.layers[0].self_attn
    assert layer.feature_attributes == ("output_gate", "head_scale")  # registered after the built-ins
    ids = torch.randint(1, 90, (2, 9))
    with torch.no_grad():
        # Identity at init: the same logits as the model without it (same seed, same other weights).
        torch.testing.assert_close(model(ids).logits, base(ids).logits, rtol=0, atol=1e-6)
        for block in model.model.layers:
            block.self_attn.head_scale.weight.copy_(torch.tensor([0.5, 1.5, -1.0, 2.0]))
        scaled = model(ids).logits
    assert (scaled - base(ids).logits).abs().max() > 1e-3  # it acts
    assert any(n.endswith("head_scale.weight") for n in hf_arch.new_parameter_names(model))
    # Cached decode matches the full forward.
    out = model.generate(ids[:, :5], max_new_tokens=4, do_sample=False, output_logits=True,
                         return_dict_in_generate=True, pad_token_id=0)
    with torch.no_grad():
        full = model(out.sequences).logits
    for step, logits in enumerate(out.logits):
        torch.testing.assert_close(logits, full[:, 4 + step], rtol=1e-5, atol=1e-5)
    # A config whose mixers build no softmax attention refuses the switch by name.
    with pytest.raises(ValueError, match=r"attn_head_scale=True acts on softmax attention mixers .* builds it"):
        hf_arch.GLAConfig(attn_head_scale=True, **TINY)


def test_an_external_score_decodes_like_the_full_forward_and_keeps_flash_off(extension):
    config = hf_arch.GatedAttentionConfig(attn_score_function="sigmoid", **TINY)
    assert config.attention_needs_padding_mask
    assert any("sigmoid attention" in line for line in config.attention_kernel_conflicts())
    model = _model(config)
    assert type(model.model.layers[0].self_attn.score).__name__ == "SigmoidScore"
    ids = torch.randint(1, 90, (2, 9))
    mask = torch.ones_like(ids)
    ids[0, :2], mask[0, :2] = 0, 0  # left padding reaches the score as the 2-D mask
    out = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, output_logits=True,
                         return_dict_in_generate=True, pad_token_id=0)
    full_mask = torch.cat([mask, torch.ones(2, 4, dtype=mask.dtype)], dim=1)
    with torch.no_grad():
        full = model(out.sequences, attention_mask=full_mask).logits
        maps = model(ids, attention_mask=mask, output_attentions=True).attentions[0]
    for step, logits in enumerate(out.logits):
        torch.testing.assert_close(logits, full[:, 8 + step], rtol=1e-5, atol=1e-5)
    # The maps are sigmoid weights (not rows summing to one), zero on padded keys and above the diagonal.
    assert maps[0, :, :, :2].abs().max() == 0 and maps[1].triu(1).abs().max() == 0
    assert not torch.allclose(maps[1].sum(-1), torch.ones_like(maps[1].sum(-1)))


def test_external_parts_save_load_and_export_remote_code(extension, tmp_path):
    model = _model(hf_arch.GatedAttentionConfig(attn_head_scale=True, attn_score_function="sigmoid", **TINY))
    with torch.no_grad():
        model.model.layers[1].self_attn.head_scale.weight.mul_(0.25)  # a trained value survives
    model.save_pretrained(tmp_path / "saved")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved").eval()
    ids = torch.randint(1, 90, (1, 7))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=1e-6)
    modeling = (tmp_path / "saved" / "modeling_hf_arch.py").read_text()
    assert "class HeadScale(AttentionFeature)" in modeling and "class SigmoidScore(OwnOpScore)" in modeling
    remote_tests = _load_sibling("test_remote_code")
    remote_tests._assert_hidden_load_matches(model, remote_tests._run_hidden(tmp_path, tmp_path / "saved"))
    # A checkpoint that does not use them does not carry them.
    _model(hf_arch.GatedAttentionConfig(**TINY)).save_pretrained(tmp_path / "plain")
    assert "HeadScale" not in (tmp_path / "plain" / "modeling_hf_arch.py").read_text()


def test_registries_refuse_what_they_cannot_build(extension):
    with pytest.raises(ValueError, match=r"attn_score_function must be one of \(.*'sigmoid'\) \(registered scores\), "
                                         r"got 'sigmoyd'"):
        hf_arch.GatedAttentionConfig(attn_score_function="sigmoyd", **TINY)
    # A saved config may name a score its remote code registers after the config loads: the build names a typo.
    saved = hf_arch.GatedAttentionConfig(**TINY).to_dict() | {"attn_score_function": "sigmoyd"}
    typo = hf_arch.GatedAttentionConfig.from_dict(saved)
    with pytest.raises(ValueError, match=r"attn_score_function 'sigmoyd' is not registered; registered: \[.*'sigmoid'"):
        hf_arch.GatedAttentionForCausalLM(typo)
    with pytest.raises(ValueError, match=r"attn_score_function must be a registered score name"):
        hf_arch.GatedAttentionConfig(attn_score_function=None, **TINY)
    from hf_arch.layers.attention_registry import register_attention_feature

    with pytest.raises(ValueError, match=r"attribute 'output_gate' is 'output_gate'.s"):
        @register_attention_feature("second_gate")
        class SecondGate(AttentionFeature):
            spec = hf_arch.AttentionFeatureSpec(attribute="output_gate", switch="attn_second_gate", off=None)
    with pytest.raises(TypeError, match=r"must declare spec = AttentionFeatureSpec"):
        @register_attention_feature("no_spec")
        class NoSpec(AttentionFeature):
            pass


def _load_sibling(name: str):
    """A test module of the parent folder (the suite runs with --import-mode=importlib: no sys.path entry)."""
    path = Path(__file__).resolve().parents[1] / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_sibling_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
