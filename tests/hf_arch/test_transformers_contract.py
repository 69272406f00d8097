"""transformers' common model tests on every hf-arch model type.

One ``…ModelTester`` (a ``CausalLMModelTester``: tiny config, hidden 32, 2 layers, vocab 99) and one
``unittest.TestCase`` (a ``CausalLMModelTest``: transformers' ``ModelTesterMixin`` and ``TrainingTesterMixin`` from the
5.25 sdist, plus ``GenerationTesterMixin``) per model type and per composed layout the other tests use, the way
transformers tests LlamaModel / Qwen3NextModel / Qwen3MoeModel. See tests/transformers_common/ for where each mixin
comes from.

A test is skipped here only where transformers skips the same test for its analogous built-in model (the reason
names that test class); tests needing a GPU, flash-attn, deepspeed, … skip themselves through transformers' own
decorators. Every other failure is a bug in hf_arch.

Run: ``pytest tests/hf_arch/test_transformers_contract.py -p no:cacheprovider`` (add ``-k GLAModelTest`` for one
class; ``-m "not torch_compile_test and not torch_export_test"`` leaves out the compile / export tests, ~100 s).
"""

from __future__ import annotations

import copy
import importlib.util
import sys
import unittest
from pathlib import Path

import pytest

# transformers' test files decorate with these marks (transformers registers them in its own conftest). They must be
# known before the modules below are imported, or every use warns; pytest.mark keeps the running config.
_MARKERS = (
    "generate: generation tests (transformers)",
    "torch_compile_test: runs torch.compile (transformers)",
    "torch_export_test: runs torch.export (transformers)",
    "flash_attn_test: needs flash-attn (transformers)",
    "flash_attn_3_test: needs flash-attn 3 (transformers)",
    "flash_attn_4_test: needs flash-attn 4 (transformers)",
    "accelerate_tests: needs accelerate multi-device (transformers)",
    "is_pipeline_test: pipeline test (transformers)",
    "is_training_test: training overfit test (transformers)",
)
_pytest_config = getattr(pytest.mark, "_config", None)
if _pytest_config is not None:
    for _line in _MARKERS:
        _pytest_config.addinivalue_line("markers", _line)


def _load_transformers_common():
    """tests/transformers_common as the package ``transformers_common`` (its files use relative imports; pytest runs
    with --import-mode=importlib, so tests/ is not on sys.path)."""
    name = "transformers_common"
    if name not in sys.modules:
        root = Path(__file__).resolve().parents[1] / "transformers_common"
        spec = importlib.util.spec_from_file_location(name, root / "__init__.py", submodule_search_locations=[str(root)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


import transformers  # noqa: E402

# The vendored mixins are transformers 5.25's; older releases lack what they import (e.g. require_flex_attention).
if tuple(int(p) for p in transformers.__version__.split(".")[:2]) < (5, 25):
    pytest.skip(f"transformers' 5.25 common model tests need transformers >= 5.25 (installed "
                f"{transformers.__version__})", allow_module_level=True)

_load_transformers_common()

import torch  # noqa: E402,F401
from transformers.models.auto import modeling_auto  # noqa: E402
from transformers.testing_utils import require_torch, torch_device  # noqa: E402
from transformers_common.causal_lm_tester import CausalLMModelTest, CausalLMModelTester  # noqa: E402

import hf_arch  # noqa: E402
from hf_arch.layers.rope import HfArchRotaryEmbedding  # noqa: E402


# transformers' tests tell a base model from a head by its class name in the built-in *_MAPPING_NAMES (e.g. the
# training tests leave base models out, _prepare_for_class adds labels for heads). Our classes are registered through
# Auto*.register, which those name tables do not see: list them there for this module's run.
_NAME_TABLES = {
    "model_class": modeling_auto.MODEL_MAPPING_NAMES,
    "causal_lm_class": modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    "sequence_classification_class": modeling_auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
}


@pytest.fixture(scope="module", autouse=True)
def _hf_arch_in_transformers_name_tables():
    added = []
    for variant in _variants():
        model_type = variant.config_class.model_type
        for attribute, table in _NAME_TABLES.items():
            model_class = getattr(variant, attribute, None)
            if model_class is not None and model_type not in table:
                table[model_type] = model_class.__name__
                added.append((table, model_type))
    yield
    for table, model_type in added:
        table.pop(model_type, None)


def _variants():
    return list(hf_arch.VARIANTS.values())


# ----------------------------------------------------------------------------------------------------- testers

class HfArchModelTester(CausalLMModelTester):
    """Tiny models: hidden 32, 2 layers, 2 heads (head_dim 16), vocab 99. max_position_embeddings 64 keeps the RoPE
    tests' 1.5 × max_position_embeddings inputs short (Cubit is O(T³))."""

    def __init__(self, parent, **kwargs):
        kwargs.setdefault("max_position_embeddings", 64)
        super().__init__(parent, **kwargs)


def _tester(name, variant, **overrides):
    """A CausalLMModelTester for ``variant`` whose config gets ``overrides`` on top of the tiny defaults."""

    def __init__(self, parent):
        HfArchModelTester.__init__(self, parent, **{k: v for k, v in overrides.items() if k in _TESTER_ARGS})
        for key, value in overrides.items():
            if key not in _TESTER_ARGS:
                setattr(self, key, value)

    return type(name, (HfArchModelTester,), {
        "config_class": variant.config_class,
        "base_model_class": variant.model_class,
        "causal_lm_class": variant.causal_lm_class,
        "sequence_classification_class": variant.sequence_classification_class,
        "__init__": __init__,
    })


_TESTER_ARGS = {"hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size",
                "vocab_size", "max_position_embeddings", "seq_length", "batch_size"}

V = hf_arch.models

GatedAttentionModelTester = _tester("GatedAttentionModelTester", V.GATED_ATTENTION)
GLAModelTester = _tester("GLAModelTester", V.GLA)
GatedDeltaNetModelTester = _tester("GatedDeltaNetModelTester", V.GATED_DELTANET)
GatedDeltaNetHybridModelTester = _tester(
    "GatedDeltaNetHybridModelTester", V.GATED_DELTANET, layer_types=["linear_attention", "full_attention"]
)
_MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=12)
MoEModelTester = _tester("MoEModelTester", V.MOE, **_MOE)
MoEQwenMoEModelTester = _tester("MoEQwenMoEModelTester", V.MOE, moe_preset="qwen_moe", **_MOE)
MoEPlusPlusModelTester = _tester("MoEPlusPlusModelTester", V.MOE, moe_preset="moe_plus_plus", **_MOE)
SASoftmaxModelTester = _tester("SASoftmaxModelTester", V.SA_SOFTMAX)
AffineAttentionModelTester = _tester("AffineAttentionModelTester", V.AFFINE_ATTENTION)
MoVEModelTester = _tester("MoVEModelTester", V.MOVE, move_num_slots=8)
DiffAttentionModelTester = _tester("DiffAttentionModelTester", V.DIFF_ATTENTION, num_attention_heads=4,
                                   num_key_value_heads=2)
CubitModelTester = _tester("CubitModelTester", V.CUBIT)
SASModelTester = _tester("SASModelTester", V.SAS)
GeoNormModelTester = _tester("GeoNormModelTester", V.GEONORM)
_SPARSE = dict(sparse_attn_block_size=4)
_FLUX = dict(_SPARSE, sparse_attn_window_blocks=1, sparse_attn_router_hidden=16)  # Flux-only: a Seer config refuses them
SeerAttentionModelTester = _tester("SeerAttentionModelTester", V.SPARSE_ATTENTION, sparse_attn_method="seer", **_SPARSE)
FluxAttentionModelTester = _tester("FluxAttentionModelTester", V.SPARSE_ATTENTION, sparse_attn_method="flux", **_FLUX)


# ------------------------------------------------------------------------------------------------- test classes

class HfArchModelTest(CausalLMModelTest):
    rotary_embedding_layer = HfArchRotaryEmbedding


def check_attention_outputs(test, num_maps: int, heads: int):
    """transformers' ``test_attention_outputs`` for a model whose maps are not one per layer of
    ``num_attention_heads`` heads: ``num_maps`` maps of ``heads`` heads, whether asked for by argument or by config,
    and the attentions stay the last output."""
    config, inputs_dict = test.model_tester.prepare_config_and_inputs_for_common()
    config.return_dict = True
    seq_len = test.model_tester.seq_length
    expected = [heads, seq_len, seq_len]
    for model_class in test.all_model_classes:
        inputs = test._prepare_for_class(inputs_dict, model_class)
        model = model_class._from_config(config, attn_implementation="eager").to(torch_device).eval()
        with torch.no_grad():
            outputs = model(**inputs, output_attentions=True, output_hidden_states=False)
        test.assertEqual(len(outputs.attentions), num_maps)
        test.assertListEqual(list(outputs.attentions[0].shape[-3:]), expected)

        by_config = copy.deepcopy(model.config)
        by_config.output_attentions = True
        model = model_class(by_config).to(torch_device).eval()
        with torch.no_grad():
            outputs = model(**inputs)
        test.assertEqual(len(outputs.attentions), num_maps)
        test.assertListEqual(list(outputs.attentions[0].shape[-3:]), expected)
        out_len = len(outputs)
        with torch.no_grad():
            outputs = model(**inputs, output_hidden_states=True)
        test.assertEqual(out_len + 1, len(outputs))
        test.assertEqual(len(outputs.attentions), num_maps)
        test.assertListEqual(list(outputs.attentions[0].shape[-3:]), expected)


@require_torch
class GatedAttentionModelTest(HfArchModelTest, unittest.TestCase):
    model_tester_class = GatedAttentionModelTester


@require_torch
class GLAModelTest(HfArchModelTest, unittest.TestCase):
    """All-linear GLA (no layer uses RoPE)."""

    model_tester_class = GLAModelTester
    rotary_embedding_layer = None
    has_attentions = False  # as MambaModelTest / Mamba2ModelTest: no layer computes an attention map


@require_torch
class GatedDeltaNetModelTest(HfArchModelTest, unittest.TestCase):
    """All-linear Gated DeltaNet (no layer uses RoPE)."""

    model_tester_class = GatedDeltaNetModelTester
    rotary_embedding_layer = None
    has_attentions = False  # as MambaModelTest / Mamba2ModelTest: no layer computes an attention map


@require_torch
class GatedDeltaNetHybridModelTest(HfArchModelTest, unittest.TestCase):
    """Gated DeltaNet + full attention, Qwen3-Next's layout."""

    model_tester_class = GatedDeltaNetHybridModelTester

    def test_attention_outputs(self):
        """Replaces the common test as Qwen3NextModelTest does for its hybrid: only the full-attention layers give an
        attention map, so ``attentions`` has one entry per full-attention layer."""
        config, _ = self.model_tester.prepare_config_and_inputs_for_common()
        num_full = sum(layer_type == "full_attention" for layer_type in config.layer_types)
        check_attention_outputs(self, num_maps=num_full, heads=config.num_attention_heads)


@require_torch
class MoEModelTest(HfArchModelTest, unittest.TestCase):
    model_tester_class = MoEModelTester
    # As Qwen3MoeModelTest: experts a batch does not route to get no gradient.
    test_all_params_have_gradient = False


@require_torch
class MoEQwenMoEModelTest(HfArchModelTest, unittest.TestCase):
    model_tester_class = MoEQwenMoEModelTester
    test_all_params_have_gradient = False  # as Qwen3MoeModelTest


@require_torch
class MoEPlusPlusModelTest(HfArchModelTest, unittest.TestCase):
    model_tester_class = MoEPlusPlusModelTester
    test_all_params_have_gradient = False  # as Qwen3MoeModelTest


@require_torch
class SASoftmaxModelTest(HfArchModelTest, unittest.TestCase):
    model_tester_class = SASoftmaxModelTester


@require_torch
class AffineAttentionModelTest(HfArchModelTest, unittest.TestCase):
    model_tester_class = AffineAttentionModelTester


@require_torch
class MoVEModelTest(HfArchModelTest, unittest.TestCase):
    model_tester_class = MoVEModelTester


@require_torch
class DiffAttentionModelTest(HfArchModelTest, unittest.TestCase):
    model_tester_class = DiffAttentionModelTester


@require_torch
class CubitModelTest(HfArchModelTest, unittest.TestCase):
    model_tester_class = CubitModelTester


@require_torch
class SASModelTest(HfArchModelTest, unittest.TestCase):
    """SAS attends over ``sas_num_heads`` simulated heads (keys ``sas_qk_dim`` wide, values ``head_dim``) and caches
    those, as MLA caches its own key/value widths: the shape checks read that geometry, as transformers'
    DeepseekV3ModelTest overrides its cache check for MLA. Everything else is the common suite unchanged."""

    model_tester_class = SASModelTester

    def _attention_map_heads(self, config):
        return config.sas_num_heads

    def _kv_shape_params(self, config):
        ratio = config.sas_num_heads // config.num_attention_heads
        return config.num_key_value_heads * ratio, config.sas_qk_dim, config.head_dim

    def test_attention_outputs(self):
        config, _ = self.model_tester.prepare_config_and_inputs_for_common()
        check_attention_outputs(self, num_maps=config.num_hidden_layers, heads=config.sas_num_heads)


@require_torch
class GeoNormModelTest(HfArchModelTest, unittest.TestCase):
    model_tester_class = GeoNormModelTester


@require_torch
class SeerAttentionModelTest(HfArchModelTest, unittest.TestCase):
    model_tester_class = SeerAttentionModelTester


@require_torch
class FluxAttentionModelTest(HfArchModelTest, unittest.TestCase):
    model_tester_class = FluxAttentionModelTester


# ------------------------------------------------------------------ every other variant, from its registered examples

# Variants with a hand-written class above; every other registered variant is tested through its examples
# (Variant.examples), with the class attributes its layout implies, so a new variant needs no edit here.
_HAND_WRITTEN = {"gated_attention", "gla", "gated_deltanet", "moe", "sa_softmax", "affine_attention", "move",
                 "diff_attention", "cubit", "sas", "geonorm", "sparse_attention"}


def _example_test_case(key: str, variant_name: str, fields: dict) -> type:
    """A ``CausalLMModelTest`` for one example layout: no attention maps / RoPE table where no layer has them (as
    transformers' Mamba / Qwen3Next tests), one map per softmax layer in hybrids, MLA's latent cache widths (as its
    DeepseekV3ModelTest), no all-parameters-get-gradients check with MoE layers (as Qwen3MoeModelTest)."""
    variant = hf_arch.get_variant(variant_name)
    name = "".join(part.title() for part in key.replace(":", "_").split("_"))
    layers = fields.get("num_hidden_layers", 2)
    if layers > 2:  # transformers' testers have at most 2 layers (test_num_layers_is_small): keep the first and last
        fields = {k: ([v[0], v[-1]] if isinstance(v, list) and len(v) == layers else v) for k, v in fields.items()}
        fields["num_hidden_layers"] = 2
    tester = _tester(f"{name}ModelTester", variant, **fields)
    config = tester(None).get_config()
    mixers = [config.token_mixer_type(i) for i in range(config.num_hidden_layers)]
    softmax_layers = sum(t in ("full_attention", "sliding_attention") for t in config.layer_types)
    body = {"model_tester_class": tester, "__doc__": f"hf_arch.registry example {key!r}: token mixers {mixers}."}
    if not {"attention", "sparse_attention"} & set(mixers):
        body["rotary_embedding_layer"] = None
    if softmax_layers == 0:
        body["has_attentions"] = False
    elif softmax_layers < config.num_hidden_layers:
        def test_attention_outputs(self):
            check_attention_outputs(self, num_maps=softmax_layers, heads=config.num_attention_heads)

        body["test_attention_outputs"] = test_attention_outputs
    if "sparse" in config.mlp_layer_types:
        body["test_all_params_have_gradient"] = False
    if "mla" in mixers:
        latent = config.options_of("mla")
        body["_kv_shape_params"] = lambda self, config: (1, latent["kv_lora_rank"], latent["qk_rope_head_dim"])
    return require_torch(type(f"{name}ModelTest", (HfArchModelTest, unittest.TestCase), body))


for _key, (_variant, _fields) in hf_arch.registry.example_layouts().items():
    if _variant not in _HAND_WRITTEN:
        _case = _example_test_case(_key, _variant, _fields)
        globals()[_case.__name__] = _case
globals().pop("_case", None)  # a module-level name for a TestCase would be collected a second time
