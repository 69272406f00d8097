# Copyright 2026 the hf-arch authors.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
#
# NOT vendored: transformers' PyPI sdist does not ship tests/causal_lm_tester.py. This is hf-arch's own
# CausalLMModelTester / CausalLMModelTest with the same interface (a tester per model type declares config_class,
# base_model_class, causal_lm_class, sequence_classification_class and overrides attributes in __init__; the test
# class sets model_tester_class), so a tester reads like transformers' LlamaModelTester / Qwen3NextModelTester.
# The test class combines the vendored ModelTesterMixin (test_modeling_common.py) and TrainingTesterMixin
# (test_training_mixin.py) with generation/test_utils.py's GenerationTesterMixin. transformers' PipelineTesterMixin
# is left out: its tests need the Hub's tiny checkpoints (hf-internal-testing) and the transformers source tree.
"""CausalLMModelTester / CausalLMModelTest for decoder-only causal LMs."""

import inspect

from parameterized import parameterized

from transformers import is_torch_available, set_seed
from transformers.testing_utils import require_torch, torch_device

from .generation.test_utils import GenerationTesterMixin
from .test_configuration_common import ConfigTester
from .test_modeling_common import ModelTesterMixin, ids_tensor
from .test_training_mixin import TrainingTesterMixin


if is_torch_available():
    import torch


def _config_parameter_names(config_class) -> set:
    """Keyword names a config class accepts, along its MRO (subclasses often take **kwargs only)."""
    names = set()
    for klass in config_class.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        for name, param in inspect.signature(init).parameters.items():
            if name != "self" and param.kind not in (param.VAR_KEYWORD, param.VAR_POSITIONAL):
                names.add(name)
    return names


class CausalLMModelTester:
    _required_attributes = ("base_model_class", "config_class", "causal_lm_class")
    # Arguments passed to the config even if not in its signature.
    forced_config_args = ["pad_token_id"]
    config_class = None
    base_model_class = None
    causal_lm_class = None
    sequence_classification_class = None
    token_classification_class = None
    question_answering_class = None

    @property
    def all_model_classes(self):
        return [
            model_class
            for model_class in (
                self.base_model_class,
                self.causal_lm_class,
                self.sequence_classification_class,
                self.token_classification_class,
                self.question_answering_class,
            )
            if model_class is not None
        ]

    def __init__(
        self,
        parent,
        batch_size=13,
        seq_length=7,
        is_training=True,
        use_input_mask=True,
        use_token_type_ids=False,
        use_labels=True,
        vocab_size=99,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        intermediate_size=37,
        hidden_act="gelu",
        max_position_embeddings=512,
        type_vocab_size=16,
        type_sequence_label_size=2,
        initializer_range=0.02,
        num_labels=3,
        num_choices=4,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        scope=None,
    ):
        for name in self._required_attributes:
            if getattr(self, name) is None:
                raise ValueError(f"{type(self).__name__} inherits from CausalLMModelTester but did not set {name}")
        self.parent = parent
        self.batch_size = batch_size
        self.seq_length = seq_length
        self.is_training = is_training
        self.use_input_mask = use_input_mask
        self.use_token_type_ids = use_token_type_ids
        self.use_labels = use_labels
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.intermediate_size = intermediate_size
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.type_vocab_size = type_vocab_size
        self.type_sequence_label_size = type_sequence_label_size
        self.initializer_range = initializer_range
        self.num_labels = num_labels
        self.num_choices = num_choices
        self.pad_token_id = pad_token_id
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.scope = scope
        self.head_dim = hidden_size // num_attention_heads

    def get_config(self):
        names = _config_parameter_names(self.config_class) | set(self.forced_config_args)
        kwargs = {name: getattr(self, name) for name in sorted(names) if hasattr(self, name)}
        return self.config_class(**kwargs)

    def prepare_config_and_inputs(self):
        input_ids = ids_tensor([self.batch_size, self.seq_length], self.vocab_size)
        input_mask = None
        if self.use_input_mask:
            # Lower-triangular: row i has i + 1 real tokens followed by padding.
            input_mask = torch.tril(torch.ones_like(input_ids).to(torch_device))
        token_type_ids = None
        if self.use_token_type_ids:
            token_type_ids = ids_tensor([self.batch_size, self.seq_length], self.type_vocab_size)
        sequence_labels = token_labels = choice_labels = None
        if self.use_labels:
            sequence_labels = ids_tensor([self.batch_size], self.type_sequence_label_size)
            token_labels = ids_tensor([self.batch_size, self.seq_length], self.num_labels)
            choice_labels = ids_tensor([self.batch_size], self.num_choices)
        config = self.get_config()
        return config, input_ids, token_type_ids, input_mask, sequence_labels, token_labels, choice_labels

    def create_and_check_model(
        self, config, input_ids, token_type_ids, input_mask, sequence_labels, token_labels, choice_labels
    ):
        model = self.base_model_class(config=config)
        model.to(torch_device)
        model.eval()
        model(input_ids, attention_mask=input_mask)
        result = model(input_ids)
        self.parent.assertEqual(result.last_hidden_state.shape, (self.batch_size, self.seq_length, self.hidden_size))

    def prepare_config_and_inputs_for_common(self):
        config, input_ids, _, input_mask, *_ = self.prepare_config_and_inputs()
        return config, {"input_ids": input_ids, "attention_mask": input_mask}


@require_torch
class CausalLMModelTest(ModelTesterMixin, GenerationTesterMixin, TrainingTesterMixin):
    model_tester = None
    model_tester_class = None
    all_model_classes = None
    # The model's rotary embedding class (built from a config); None means the model has no RoPE.
    rotary_embedding_layer = None

    def setUp(self):
        if self.model_tester_class is None:
            raise ValueError(f"{type(self).__name__} inherits from CausalLMModelTest but did not set model_tester_class")
        self.model_tester = self.model_tester_class(self)
        self.config_tester = ConfigTester(self, config_class=self.model_tester.config_class)
        if self.all_model_classes is None:
            self.all_model_classes = self.model_tester.all_model_classes

    def test_config(self):
        self.config_tester.run_common_tests()

    def test_model(self):
        self.model_tester.create_and_check_model(*self.model_tester.prepare_config_and_inputs())

    def _check_sequence_classification(self, problem_type=None):
        if self.model_tester.sequence_classification_class is None:
            self.skipTest("Model does not support sequence classification")
        config, input_dict = self.model_tester.prepare_config_and_inputs_for_common()
        config.num_labels = 3
        if problem_type is not None:
            config.problem_type = problem_type
        input_ids = input_dict["input_ids"]
        attention_mask = input_ids.ne(1).to(torch_device)
        if problem_type == "multi_label_classification":
            labels = ids_tensor(
                [self.model_tester.batch_size, config.num_labels], self.model_tester.type_sequence_label_size
            ).to(torch.float)
        else:
            labels = ids_tensor([self.model_tester.batch_size], self.model_tester.type_sequence_label_size)
        model = self.model_tester.sequence_classification_class(config).to(torch_device).eval()
        result = model(input_ids, attention_mask=attention_mask, labels=labels)
        self.assertEqual(result.logits.shape, (self.model_tester.batch_size, self.model_tester.num_labels))
        self.assertIsNotNone(result.loss)

    def test_sequence_classification_model(self):
        self._check_sequence_classification()

    def test_sequence_classification_model_for_single_label(self):
        self._check_sequence_classification("single_label_classification")

    def test_sequence_classification_model_for_multi_label(self):
        self._check_sequence_classification("multi_label_classification")

    def test_token_classification_model(self):
        if self.model_tester.token_classification_class is None:
            self.skipTest("Model does not support token classification")
        config, input_dict = self.model_tester.prepare_config_and_inputs_for_common()
        config.num_labels = 3
        input_ids = input_dict["input_ids"]
        attention_mask = input_ids.ne(1).to(torch_device)
        labels = ids_tensor([self.model_tester.batch_size, self.model_tester.seq_length], config.num_labels)
        model = self.model_tester.token_classification_class(config=config).to(torch_device).eval()
        result = model(input_ids, attention_mask=attention_mask, labels=labels)
        self.assertEqual(
            result.logits.shape, (self.model_tester.batch_size, self.model_tester.seq_length, config.num_labels)
        )

    @parameterized.expand([("linear",), ("dynamic",), ("yarn",)])
    def test_model_rope_scaling_from_config(self, scaling_type):
        """A scaled RoPE (config.rope_parameters) changes long-input outputs; dynamic scaling leaves inputs shorter
        than max_position_embeddings unchanged."""
        if self.rotary_embedding_layer is None:
            self.skipTest("Rotary embedding layer not set")
        config, _ = self.model_tester.prepare_config_and_inputs_for_common()
        short_input = ids_tensor([1, 10], config.vocab_size)
        long_input = ids_tensor([1, int(config.max_position_embeddings * 1.5)], config.vocab_size)

        set_seed(42)
        original = self.model_tester.base_model_class(config).to(torch_device).eval()
        with torch.no_grad():
            original_short = original(short_input).last_hidden_state
            original_long = original(long_input).last_hidden_state

        set_seed(42)
        theta = (config.rope_parameters or {}).get("rope_theta", getattr(config, "default_theta", 10000.0))
        config.rope_parameters = {"rope_type": scaling_type, "factor": 10.0, "rope_theta": theta}
        scaled = self.model_tester.base_model_class(config).to(torch_device).eval()
        with torch.no_grad():
            scaled_short = scaled(short_input).last_hidden_state
            scaled_long = scaled(long_input).last_hidden_state

        if scaling_type == "dynamic":
            torch.testing.assert_close(original_short, scaled_short, rtol=1e-5, atol=1e-5)
        else:
            self.assertFalse(torch.allclose(original_short, scaled_short, atol=1e-5))
        self.assertFalse(torch.allclose(original_long, scaled_long, atol=1e-5))

    def test_model_rope_scaling(self):
        """Linear RoPE scaling: position x gets the angles of the original position x / factor."""
        if self.rotary_embedding_layer is None:
            self.skipTest("Rotary embedding layer not set")
        config, _ = self.model_tester.prepare_config_and_inputs_for_common()
        factor = 10
        short_len, long_len = 10, int(config.max_position_embeddings * 1.5)
        x = torch.randn(1, dtype=torch.float32, device=torch_device)
        pos_short = torch.arange(short_len, dtype=torch.long, device=torch_device).unsqueeze(0)
        pos_long = torch.arange(long_len, dtype=torch.long, device=torch_device).unsqueeze(0)

        rope = self.rotary_embedding_layer(config).to(torch_device)
        cos_short, sin_short = rope(x, pos_short)
        cos_long, sin_long = rope(x, pos_long)
        torch.testing.assert_close(cos_short, cos_long[:, :short_len, :])
        torch.testing.assert_close(sin_short, sin_long[:, :short_len, :])

        theta = (config.rope_parameters or {}).get("rope_theta", getattr(config, "default_theta", 10000.0))
        config.rope_parameters = {"rope_type": "linear", "factor": factor, "rope_theta": theta}
        linear = self.rotary_embedding_layer(config).to(torch_device)
        lin_cos_short, lin_sin_short = linear(x, pos_short)
        lin_cos_long, _ = linear(x, pos_long)
        torch.testing.assert_close(lin_cos_short, lin_cos_long[:, :short_len, :])
        for new_pos in (0, 10, 20):
            original_pos = new_pos // factor
            torch.testing.assert_close(lin_cos_long[:, new_pos, :], cos_long[:, original_pos, :])
            torch.testing.assert_close(
                linear(x, pos_long)[1][:, new_pos, :], sin_long[:, original_pos, :]
            )
        del lin_sin_short
