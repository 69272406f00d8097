"""Harness self-check (not part of the suite, not collected by default): the same CausalLMModelTest on transformers'
own Llama, Qwen3-Next and Qwen3-MoE. A test failing here is a harness problem, not an hf_arch bug.

    pytest tests/transformers_common/check_builtin_models.py -p no:cacheprovider   # ~20 min on 2 CPU cores

Measured on transformers 5.25.0: everything passes except Qwen3NextControlTest::test_attention_outputs, which
transformers' Qwen3NextModelTest replaces for its hybrid layout (see GatedDeltaNetHybridModelTest).
"""

import importlib.util
import sys
import unittest
from pathlib import Path


if "transformers_common" not in sys.modules:
    _root = Path(__file__).resolve().parent
    _spec = importlib.util.spec_from_file_location(
        "transformers_common", _root / "__init__.py", submodule_search_locations=[str(_root)]
    )
    _module = importlib.util.module_from_spec(_spec)
    sys.modules["transformers_common"] = _module
    _spec.loader.exec_module(_module)

from transformers import (  # noqa: E402
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    LlamaModel,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
    Qwen3MoeModel,
    Qwen3NextConfig,
    Qwen3NextForCausalLM,
    Qwen3NextModel,
)
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding  # noqa: E402
from transformers_common.causal_lm_tester import CausalLMModelTest, CausalLMModelTester  # noqa: E402


_TINY_MOE = dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=12, shared_expert_intermediate_size=36)


class LlamaModelTester(CausalLMModelTester):
    config_class = LlamaConfig
    base_model_class = LlamaModel
    causal_lm_class = LlamaForCausalLM
    sequence_classification_class = LlamaForSequenceClassification


class LlamaControlTest(CausalLMModelTest, unittest.TestCase):
    model_tester_class = LlamaModelTester
    rotary_embedding_layer = LlamaRotaryEmbedding


class Qwen3NextModelTester(CausalLMModelTester):
    config_class = Qwen3NextConfig
    base_model_class = Qwen3NextModel
    causal_lm_class = Qwen3NextForCausalLM

    def __init__(self, parent):
        super().__init__(parent=parent)
        self.hidden_act = "silu"
        self.layer_types = ["linear_attention", "full_attention"]
        self.linear_conv_kernel_dim = 2
        self.linear_key_head_dim = 16
        self.linear_value_head_dim = 16
        self.linear_num_key_heads = 4
        self.linear_num_value_heads = 8
        for key, value in _TINY_MOE.items():
            setattr(self, key, value)


class Qwen3NextControlTest(CausalLMModelTest, unittest.TestCase):
    model_tester_class = Qwen3NextModelTester


class Qwen3MoeModelTester(CausalLMModelTester):
    config_class = Qwen3MoeConfig
    base_model_class = Qwen3MoeModel
    causal_lm_class = Qwen3MoeForCausalLM

    def __init__(self, parent):
        super().__init__(parent=parent)
        for key, value in _TINY_MOE.items():
            setattr(self, key, value)


class Qwen3MoeControlTest(CausalLMModelTest, unittest.TestCase):
    model_tester_class = Qwen3MoeModelTester
    test_all_params_have_gradient = False  # as Qwen3MoeModelTest
