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
# NOT vendored: transformers' PyPI sdist does not ship tests/generation/test_utils.py, and the copies of it that could
# be read elsewhere predate the 5.x generation API (greedy_search, BeamSearchScorer, ... no longer exist). This file
# is hf-arch's own GenerationTesterMixin written against the transformers 5.25 `generate()` API: the same test names
# and contract as transformers' mixin (greedy / sample / beam search / beam sample, dict outputs with and without
# cache, assisted and prompt-lookup decoding equal to greedy, left padding, cache format, generation from
# inputs_embeds, continuing from a cache, static cache, compiled forward, logits_to_keep, position_ids), so that
# `test_modeling_common.py` (vendored from the 5.25 sdist) finds the mixin it imports.
"""GenerationTesterMixin for decoder-only causal LMs, against transformers 5.25's `generate()`."""

import copy
import inspect
import tempfile

import pytest
from parameterized import parameterized

from transformers import is_torch_available
from transformers.testing_utils import (
    require_optimum_quanto,
    set_config_for_less_flaky_test,
    set_model_for_less_flaky_test,
    torch_device,
)


if is_torch_available():
    import torch

    from transformers import GenerationMixin
    from transformers.cache_utils import Cache, DynamicCache, StaticCache
    from transformers.cache_utils import CacheLayerMixin, LinearAttentionCacheLayerMixin
    from transformers.generation import (
        CompileConfig,
        GenerateBeamDecoderOnlyOutput,
        GenerateDecoderOnlyOutput,
    )


def _is_linear_only(layer) -> bool:
    """A cache layer holding only linear-attention (conv / recurrent) states."""
    return isinstance(layer, LinearAttentionCacheLayerMixin) and not isinstance(layer, CacheLayerMixin)


def _has_kv(layer) -> bool:
    return isinstance(layer, CacheLayerMixin) and getattr(layer, "keys", None) is not None


class GenerationTesterMixin:
    input_name = "input_ids"
    model_tester = None
    max_new_tokens = 3

    # ------------------------------------------------------------------ inputs and kwargs

    def prepare_config_and_inputs_for_generate(self, batch_size=2):
        config, inputs_dict = self.model_tester.prepare_config_and_inputs_for_common()
        ignored = ("decoder_input_ids", "decoder_attention_mask", "use_cache", "labels")
        filtered = {
            k: v[:batch_size, ...] if isinstance(v, torch.Tensor) else v
            for k, v in inputs_dict.items()
            if k not in ignored
        }
        text_config = config.get_text_config(decoder=True)
        # Generate to the requested length: no EOS may stop a row early (length checks below rely on it).
        if getattr(text_config, "eos_token_id", None) is not None and getattr(text_config, "pad_token_id", None) is None:
            eos = text_config.eos_token_id
            text_config.pad_token_id = eos if isinstance(eos, int) else eos[0]
        text_config.eos_token_id = None
        text_config.forced_eos_token_id = None
        return config, filtered

    @staticmethod
    def _get_logits_processor_kwargs(do_sample=False, config=None):
        kwargs = {"bad_words_ids": [[1, 0]], "repetition_penalty": 1.2, "remove_invalid_values": True}
        if do_sample:
            kwargs.update({"top_k": 10, "top_p": 0.7, "temperature": 0.7})
        return kwargs

    @staticmethod
    def _get_beam_kwargs(num_return_sequences=1):
        return {
            "early_stopping": False,
            "length_penalty": 2.0,
            "num_beams": 2,
            "num_return_sequences": num_return_sequences,
        }

    def _generate(self, model, inputs_dict, *, do_sample, num_beams=1, num_return_sequences=1, output_scores=False,
                  output_logits=False, output_attentions=False, output_hidden_states=False,
                  return_dict_in_generate=False, use_cache=True, extra=None):
        kwargs = dict(
            do_sample=do_sample,
            num_beams=num_beams,
            max_new_tokens=self.max_new_tokens,
            min_new_tokens=self.max_new_tokens,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            output_scores=output_scores,
            output_logits=output_logits,
            return_dict_in_generate=return_dict_in_generate,
            use_cache=use_cache,
            **self._get_logits_processor_kwargs(do_sample=do_sample, config=model.config),
        )
        kwargs.update(extra or {})
        kwargs.update(inputs_dict)
        if num_return_sequences > 1:
            kwargs["num_return_sequences"] = num_return_sequences
        if do_sample:
            torch.manual_seed(0)
        return model.generate(**kwargs)

    def _greedy_generate(self, model, inputs_dict, **kwargs):
        return self._generate(model, inputs_dict, do_sample=False, **kwargs)

    def _sample_generate(self, model, inputs_dict, num_return_sequences, **kwargs):
        return self._generate(model, inputs_dict, do_sample=True, num_return_sequences=num_return_sequences, **kwargs)

    def _beam_search_generate(self, model, inputs_dict, beam_kwargs, **kwargs):
        return self._generate(model, inputs_dict, do_sample=False, extra=beam_kwargs, **kwargs)

    def _beam_sample_generate(self, model, inputs_dict, beam_kwargs, **kwargs):
        return self._generate(model, inputs_dict, do_sample=True, extra=beam_kwargs, **kwargs)

    def _make_model(self, model_class, config, eager=False):
        if eager:
            model = model_class._from_config(config, attn_implementation="eager")
        else:
            model = model_class(config)
        return model.to(torch_device).eval()

    # ------------------------------------------------------------------ greedy / sample / beams

    @pytest.mark.generate
    def test_greedy_generate(self):
        for model_class in self.all_generative_model_classes:
            config, inputs_dict = self.prepare_config_and_inputs_for_generate()
            main_input = inputs_dict[model_class.main_input_name]
            model = self._make_model(model_class, config)
            output = self._greedy_generate(model, inputs_dict)
            self.assertEqual(output.shape[1], self.max_new_tokens + main_input.shape[1])

    @pytest.mark.generate
    def test_greedy_generate_dict_outputs(self):
        self._check_greedy_dict_outputs(use_cache=False)

    @pytest.mark.generate
    def test_greedy_generate_dict_outputs_use_cache(self):
        self._check_greedy_dict_outputs(use_cache=True)

    def _check_greedy_dict_outputs(self, use_cache):
        for model_class in self.all_generative_model_classes:
            config, inputs_dict = self.prepare_config_and_inputs_for_generate()
            if use_cache and not hasattr(config.get_text_config(decoder=True), "use_cache"):
                self.skipTest(reason=f"{model_class.__name__} doesn't support caching")
            main_input = inputs_dict[model_class.main_input_name]
            config.is_decoder = True
            model = self._make_model(model_class, config, eager=self.has_attentions)
            output = self._greedy_generate(
                model, inputs_dict, output_scores=True, output_logits=True,
                output_attentions=self.has_attentions, output_hidden_states=True,
                return_dict_in_generate=True, use_cache=use_cache,
            )
            self.assertIsInstance(output, GenerateDecoderOnlyOutput)
            self.assertEqual(output.sequences.shape[1], self.max_new_tokens + main_input.shape[1])
            self._check_generate_outputs(output, model.config, use_cache=use_cache)

    @pytest.mark.generate
    def test_sample_generate(self):
        for model_class in self.all_generative_model_classes:
            config, inputs_dict = self.prepare_config_and_inputs_for_generate()
            main_input = inputs_dict[model_class.main_input_name]
            model = self._make_model(model_class, config)
            output = self._sample_generate(model, inputs_dict, num_return_sequences=1)
            self.assertEqual(output.shape[1], self.max_new_tokens + main_input.shape[1])

    @pytest.mark.generate
    def test_sample_generate_dict_output(self):
        for model_class in self.all_generative_model_classes:
            config, inputs_dict = self.prepare_config_and_inputs_for_generate()
            main_input = inputs_dict[model_class.main_input_name]
            config.is_decoder = True
            model = self._make_model(model_class, config, eager=self.has_attentions)
            output = self._sample_generate(
                model, inputs_dict, num_return_sequences=2, output_scores=True, output_logits=True,
                output_attentions=self.has_attentions, output_hidden_states=True, return_dict_in_generate=True,
                use_cache=False,
            )
            self.assertIsInstance(output, GenerateDecoderOnlyOutput)
            self.assertEqual(output.sequences.shape[1], self.max_new_tokens + main_input.shape[1])
            self._check_generate_outputs(output, model.config, num_return_sequences=2)

    @pytest.mark.generate
    def test_beam_search_generate(self):
        for model_class in self.all_generative_model_classes:
            config, inputs_dict = self.prepare_config_and_inputs_for_generate()
            main_input = inputs_dict[model_class.main_input_name]
            model = self._make_model(model_class, config)
            output = self._beam_search_generate(model, inputs_dict, self._get_beam_kwargs())
            self.assertEqual(output.shape[1], self.max_new_tokens + main_input.shape[1])

    @pytest.mark.generate
    def test_beam_search_generate_dict_output(self):
        self._check_beam_dict_outputs(use_cache=False)

    @pytest.mark.generate
    def test_beam_search_generate_dict_outputs_use_cache(self):
        self._check_beam_dict_outputs(use_cache=True)

    def _check_beam_dict_outputs(self, use_cache):
        for model_class in self.all_generative_model_classes:
            config, inputs_dict = self.prepare_config_and_inputs_for_generate()
            if use_cache and not hasattr(config.get_text_config(decoder=True), "use_cache"):
                self.skipTest(reason=f"{model_class.__name__} doesn't support caching")
            main_input = inputs_dict[model_class.main_input_name]
            config.is_decoder = True
            model = self._make_model(model_class, config, eager=self.has_attentions)
            beam_kwargs = self._get_beam_kwargs()
            output = self._beam_search_generate(
                model, inputs_dict, beam_kwargs, output_scores=True, output_logits=True,
                output_attentions=self.has_attentions, output_hidden_states=True, return_dict_in_generate=True,
                use_cache=use_cache,
            )
            self.assertIsInstance(output, GenerateBeamDecoderOnlyOutput)
            self.assertEqual(output.sequences.shape[1], self.max_new_tokens + main_input.shape[1])
            self._check_generate_outputs(
                output, model.config, use_cache=use_cache,
                num_return_sequences=beam_kwargs["num_return_sequences"], num_beams=beam_kwargs["num_beams"],
            )

    @pytest.mark.generate
    def test_beam_sample_generate(self):
        for model_class in self.all_generative_model_classes:
            config, inputs_dict = self.prepare_config_and_inputs_for_generate()
            main_input = inputs_dict[model_class.main_input_name]
            model = self._make_model(model_class, config)
            output = self._beam_sample_generate(model, inputs_dict, self._get_beam_kwargs())
            self.assertEqual(output.shape[1], self.max_new_tokens + main_input.shape[1])

    @pytest.mark.generate
    def test_beam_sample_generate_dict_output(self):
        for model_class in self.all_generative_model_classes:
            config, inputs_dict = self.prepare_config_and_inputs_for_generate()
            main_input = inputs_dict[model_class.main_input_name]
            config.is_decoder = True
            model = self._make_model(model_class, config, eager=self.has_attentions)
            beam_kwargs = self._get_beam_kwargs()
            output = self._beam_sample_generate(
                model, inputs_dict, beam_kwargs, output_scores=True, output_logits=True,
                output_attentions=self.has_attentions, output_hidden_states=True, return_dict_in_generate=True,
                use_cache=False,
            )
            self.assertIsInstance(output, GenerateBeamDecoderOnlyOutput)
            self.assertEqual(output.sequences.shape[1], self.max_new_tokens + main_input.shape[1])
            self._check_generate_outputs(
                output, model.config, num_return_sequences=beam_kwargs["num_return_sequences"],
                num_beams=beam_kwargs["num_beams"],
            )

    @pytest.mark.generate
    def test_generate_without_input_ids(self):
        config, _ = self.prepare_config_and_inputs_for_generate()
        if config.get_text_config(decoder=True).bos_token_id is None:
            self.skipTest(reason="bos_token_id is None")
        if config.bos_token_id == config.pad_token_id:  # the attention mask would be all zeros otherwise
            config.pad_token_id = None
        for model_class in self.all_generative_model_classes:
            model = self._make_model(model_class, config)
            output = model.generate(do_sample=False, max_new_tokens=self.max_new_tokens, remove_invalid_values=True)
            self.assertIsNotNone(output)
            self.assertEqual(output.shape, (1, 1 + self.max_new_tokens))

    def _skip_stateful(self, model):
        """A recurrent state cannot be cropped back token by token: generate() refuses assisted decoding for such a
        model by name. transformers' GenerationTesterMixin skips its `_is_stateful` models (Mamba, Jamba, …) here too."""
        if getattr(model, "_is_stateful", False):
            self.skipTest(reason="Stateful models don't support assisted generation")

    # ------------------------------------------------------------------ assisted / prompt lookup

    @pytest.mark.generate
    @parameterized.expand([("random",), ("same",)])
    def test_assisted_decoding_matches_greedy_search(self, assistant_type):
        """Assisted decoding (a draft model proposes, the main model verifies) must not change greedy output."""
        for model_class in self.all_generative_model_classes:
            config, inputs_dict = self.prepare_config_and_inputs_for_generate(batch_size=1)
            set_config_for_less_flaky_test(config)
            config.is_decoder = True
            model = self._make_model(model_class, config, eager=True)
            self._skip_stateful(model)
            set_model_for_less_flaky_test(model)
            generation_kwargs = {
                "eos_token_id": -1,
                "max_new_tokens": 4,
                "num_beams": 1,
                "do_sample": False,
                "output_scores": True,
                "output_logits": True,
                "output_hidden_states": True,
                "output_attentions": self.has_attentions,
                "return_dict_in_generate": True,
                "use_cache": True,
            }
            processor_kwargs = self._get_logits_processor_kwargs(config=model.config)
            output_greedy = model.generate(**generation_kwargs, **inputs_dict, **processor_kwargs)

            if assistant_type == "random":
                assistant = self._make_model(model_class, config, eager=True)
                set_model_for_less_flaky_test(assistant)
            else:
                assistant = model
            assistant.generation_config.num_assistant_tokens = 2
            assistant.generation_config.num_assistant_tokens_schedule = "constant"
            generation_kwargs["assistant_model"] = assistant
            output_assisted = model.generate(**generation_kwargs, **inputs_dict, **processor_kwargs)

            self._check_similar_generate_outputs(output_greedy, output_assisted)
            for output in (output_greedy, output_assisted):
                self._check_generate_outputs(output, model.config, use_cache=True)

    @pytest.mark.generate
    def test_prompt_lookup_decoding_matches_greedy_search(self):
        """Prompt lookup decoding (n-gram candidates from the prompt) must not change greedy output."""
        for model_class in self.all_generative_model_classes:
            config, inputs_dict = self.prepare_config_and_inputs_for_generate(batch_size=1)
            set_config_for_less_flaky_test(config)
            config.is_decoder = True
            model = self._make_model(model_class, config, eager=True)
            self._skip_stateful(model)
            set_model_for_less_flaky_test(model)
            generation_kwargs = {
                "eos_token_id": -1,
                "max_new_tokens": 4,
                "num_beams": 1,
                "do_sample": False,
                "output_scores": True,
                "output_logits": True,
                "output_hidden_states": True,
                "output_attentions": self.has_attentions,
                "return_dict_in_generate": True,
                "use_cache": True,
            }
            processor_kwargs = self._get_logits_processor_kwargs(config=model.config)
            output_greedy = model.generate(**generation_kwargs, **inputs_dict, **processor_kwargs)
            generation_kwargs.update({"prompt_lookup_num_tokens": 2, "max_matching_ngram_size": 1})
            output_lookup = model.generate(**generation_kwargs, **inputs_dict, **processor_kwargs)
            self._check_similar_generate_outputs(output_greedy, output_lookup)
            for output in (output_greedy, output_lookup):
                self._check_generate_outputs(output, model.config, use_cache=True)

    @pytest.mark.generate
    def test_assisted_decoding_sample(self):
        for model_class in self.all_generative_model_classes:
            config, inputs_dict = self.prepare_config_and_inputs_for_generate(batch_size=1)
            set_config_for_less_flaky_test(config)
            config.is_decoder = True
            model = self._make_model(model_class, config, eager=True)
            self._skip_stateful(model)
            set_model_for_less_flaky_test(model)
            assistant = model
            assistant.generation_config.num_assistant_tokens = 2
            assistant.generation_config.num_assistant_tokens_schedule = "constant"
            generation_kwargs = {
                "eos_token_id": -1,
                "max_new_tokens": 4,
                "min_new_tokens": 4,
                "num_beams": 1,
                "do_sample": True,
                "assistant_model": assistant,
                "output_scores": True,
                "output_logits": True,
                "output_hidden_states": True,
                "output_attentions": self.has_attentions,
                "return_dict_in_generate": True,
                "use_cache": True,
            }
            processor_kwargs = self._get_logits_processor_kwargs(config=model.config)
            torch.manual_seed(0)
            output = model.generate(**generation_kwargs, **inputs_dict, **processor_kwargs)
            self._check_generate_outputs(output, model.config, use_cache=True)

    # ------------------------------------------------------------------ padding, cache format, embeds

    @pytest.mark.generate
    def test_left_padding_compatibility(self):
        """The last token's logits must not change when the prompt is left-padded (with the padding masked)."""
        for model_class in self.all_generative_model_classes:
            config, inputs_dict = self.prepare_config_and_inputs_for_generate()
            model = self._make_model(model_class, config)
            signature = inspect.signature(model.forward).parameters.keys()
            input_ids = inputs_dict["input_ids"]
            attention_mask = torch.ones_like(input_ids)
            pad_token_id = config.get_text_config(decoder=True).pad_token_id
            pad_token_id = 0 if pad_token_id is None else pad_token_id

            def _forward(ids, mask):
                kwargs = {"input_ids": ids, "attention_mask": mask, "use_cache": False}
                if "position_ids" in signature:
                    position_ids = mask.long().cumsum(-1) - 1
                    kwargs["position_ids"] = position_ids.masked_fill(mask == 0, 1)
                with torch.no_grad():
                    return model(**kwargs).logits[:, -1, :]

            logits_unpadded = _forward(input_ids, attention_mask)
            pad_size = (input_ids.shape[0], 32)
            padded_ids = torch.cat([torch.full(pad_size, pad_token_id, dtype=input_ids.dtype, device=torch_device),
                                    input_ids], dim=1)
            padded_mask = torch.cat([torch.zeros(pad_size, dtype=attention_mask.dtype, device=torch_device),
                                     attention_mask], dim=1)
            logits_padded = _forward(padded_ids, padded_mask)
            torch.testing.assert_close(logits_unpadded, logits_padded, rtol=1e-5, atol=1e-5)

    @pytest.mark.generate
    def test_past_key_values_format(self):
        """The cache a forward returns has one layer per decoder layer, with transformers' standard shapes."""
        for model_class in self.all_generative_model_classes:
            config, inputs = self.model_tester.prepare_config_and_inputs_for_common()
            model = self._make_model(model_class, config)
            inputs = {k: v for k, v in inputs.items() if k != "labels"}
            inputs["use_cache"] = True
            with torch.no_grad():
                outputs = model(**inputs)
            if "cache" not in outputs:
                self.skipTest(reason="This model doesn't return `cache`")
            batch_size, seq_length = inputs["input_ids"].shape[:2]
            self._check_past_key_values_for_generate(batch_size, outputs.cache, seq_length, config)

    @pytest.mark.generate
    @parameterized.expand([("greedy", 1), ("beam_search", 2)])
    def test_generate_from_inputs_embeds(self, _, num_beams):
        """generate() from inputs_embeds equals generate() from the ids those embeddings come from."""
        for model_class in self.all_generative_model_classes:
            config, inputs_dict = self.prepare_config_and_inputs_for_generate()
            config.is_decoder = True
            model = self._make_model(model_class, config)
            if "inputs_embeds" not in inspect.signature(model.prepare_inputs_for_generation).parameters:
                self.skipTest(reason="This model does not support `inputs_embeds` in generation")
            generation_kwargs = {
                "return_dict_in_generate": True,
                "output_scores": True,
                "num_beams": num_beams,
                "do_sample": False,
                "max_new_tokens": 5,
                "min_new_tokens": 5,
            }
            input_ids = inputs_dict.pop("input_ids")
            from_ids = model.generate(input_ids, **generation_kwargs, **inputs_dict)
            self.assertEqual(from_ids.sequences.shape[:2], (input_ids.shape[0], input_ids.shape[1] + 5))

            inputs_embeds = model.get_input_embeddings()(input_ids)
            from_embeds = model.generate(input_ids, inputs_embeds=inputs_embeds, **generation_kwargs, **inputs_dict)
            self._check_similar_generate_outputs(from_ids, from_embeds)

            # Other embeddings, other scores: the embeddings are really used.
            random_embeds = torch.rand_like(inputs_embeds)
            from_random = model.generate(input_ids, inputs_embeds=random_embeds, **generation_kwargs, **inputs_dict)
            for i in range(len(from_random.scores)):
                self.assertFalse(torch.allclose(from_embeds.scores[i], from_random.scores[i]))

            # Without input_ids, the newly generated tokens are the same.
            from_embeds_only = model.generate(inputs_embeds=inputs_embeds, **generation_kwargs, **inputs_dict)
            from_embeds.sequences = from_embeds.sequences[:, inputs_embeds.shape[1]:]
            self._check_similar_generate_outputs(from_embeds_only, from_embeds)

    @pytest.mark.generate
    def test_generate_from_inputs_embeds_with_static_cache(self):
        for model_class in self.all_generative_model_classes:
            if not model_class._can_compile_fullgraph:
                self.skipTest(reason="This model does not support the static cache format")
            config, inputs_dict = self.prepare_config_and_inputs_for_generate()
            model = self._make_model(model_class, config)
            if "inputs_embeds" not in inspect.signature(model.prepare_inputs_for_generation).parameters:
                self.skipTest(reason="This model does not support `inputs_embeds` in generation")
            input_ids = inputs_dict.pop("input_ids")
            model.config.use_cache = True
            model.config.is_decoder = True
            max_new_tokens = 10
            model.generation_config.eos_token_id = model.config.get_text_config().eos_token_id = -1
            inputs_embeds = model.get_input_embeddings()(input_ids)
            outputs = model.generate(
                inputs_embeds=inputs_embeds, max_new_tokens=max_new_tokens, cache_implementation="static",
                return_dict_in_generate=True, **inputs_dict,
            )
            # The cache holds every token but the last generated one.
            max_length = max_new_tokens + inputs_embeds.shape[1] - 1
            self.assertIsInstance(outputs.cache, StaticCache)
            self._check_static_cache_shapes(outputs.cache, input_ids.shape[0], max_length, model.config)

    @pytest.mark.generate
    def test_generate_continue_from_past_key_values(self):
        """Generating 3 tokens, then 1 more from the returned cache, equals generating 4 at once."""
        for model_class in self.all_generative_model_classes:
            config, inputs = self.model_tester.prepare_config_and_inputs_for_common()
            if not hasattr(config.get_text_config(decoder=True), "use_cache"):
                self.skipTest(reason=f"{model_class.__name__} doesn't support caching")
            inputs = {k: v for k, v in inputs.items() if k != "labels"}
            # Unpadded prompts: with right padding (the common inputs' lower-triangular mask) generate() itself numbers
            # the new tokens differently in one call and across two (positions continue from a padded slot).
            inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
            model = self._make_model(model_class, config)
            if "cache" not in inspect.signature(model.forward).parameters:
                self.skipTest(reason="This model doesn't take a `cache`")
            generate_kwargs = {
                "pad_token_id": -1,
                "eos_token_id": -1,
                "forced_eos_token_id": None,
                "use_cache": True,
                "do_sample": False,
                "return_dict_in_generate": True,
                "output_scores": True,
            }
            outputs = model.generate(**inputs, **generate_kwargs, max_new_tokens=4)
            outputs_cached = model.generate(**inputs, **generate_kwargs, max_new_tokens=3)
            inputs["input_ids"] = outputs_cached.sequences
            if "attention_mask" in inputs:
                extra = outputs_cached.sequences.shape[1] - inputs["attention_mask"].shape[1]
                inputs["attention_mask"] = torch.nn.functional.pad(inputs["attention_mask"], (0, extra), value=1)
            first_scores = outputs_cached.scores
            outputs_cached = model.generate(**inputs, **generate_kwargs, max_new_tokens=1, cache=outputs_cached.cache)
            outputs_cached.scores = first_scores + outputs_cached.scores
            self._check_similar_generate_outputs(outputs, outputs_cached)
            self._check_caches_are_equal(outputs.cache, outputs_cached.cache)

    @pytest.mark.generate
    def test_generate_continue_from_inputs_embeds(self):
        """Generation from inputs_embeds can continue from the returned cache with the new tokens' embeddings."""
        for model_class in self.all_generative_model_classes:
            config, inputs_dict = self.prepare_config_and_inputs_for_generate()
            inputs_dict.pop("attention_mask", None)  # no mask: the embeddings are the whole prompt
            model = self._make_model(model_class, config)
            if "inputs_embeds" not in inspect.signature(model.prepare_inputs_for_generation).parameters:
                self.skipTest(reason="This model does not support `inputs_embeds` in generation")
            model.generation_config.pad_token_id = model.generation_config.eos_token_id = -1
            model.generation_config.forced_eos_token_id = None
            model.generation_config.use_cache = True
            input_ids = inputs_dict.pop("input_ids")
            input_embeds = model.get_input_embeddings()(input_ids)
            generation_kwargs = {"return_dict_in_generate": True, "do_sample": False}

            outputs = model.generate(inputs_embeds=input_embeds, max_new_tokens=4, **generation_kwargs)
            initial = model.generate(inputs_embeds=input_embeds, max_new_tokens=3, **generation_kwargs)
            continued_embeds = torch.cat([input_embeds, model.get_input_embeddings()(initial.sequences)], dim=1)
            cached = model.generate(
                inputs_embeds=continued_embeds, max_new_tokens=1, cache=initial.cache, **generation_kwargs
            )
            # Same final token, and equal caches.
            combined = torch.cat([initial.sequences, cached.sequences], dim=1)
            self.assertListEqual(outputs.sequences.tolist(), combined.tolist())
            self._check_caches_are_equal(outputs.cache, cached.cache)

    @pytest.mark.generate
    def test_generate_with_static_cache(self):
        """generate(cache_implementation="static") returns a StaticCache of the expected shapes and the dynamic
        cache's output (fp32 and fp16)."""
        for model_class in self.all_generative_model_classes:
            if not model_class._can_compile_fullgraph:
                self.skipTest(reason="This model does not support the static cache format")
            config, inputs_dict = self.prepare_config_and_inputs_for_generate()
            set_config_for_less_flaky_test(config)
            config.is_decoder = True
            main_input = inputs_dict[model_class.main_input_name]
            batch_size = main_input.shape[0]
            seq_length = main_input.shape[-1]
            max_new_tokens = 20
            for dtype in (torch.float32, torch.float16):
                model = model_class(copy.deepcopy(config)).to(torch_device).to(dtype).eval()
                set_model_for_less_flaky_test(model)
                dtype_inputs = {
                    k: v.to(dtype) if isinstance(v, torch.Tensor) and torch.is_floating_point(v) else v
                    for k, v in inputs_dict.items()
                }
                generation_kwargs = {
                    "max_new_tokens": max_new_tokens,
                    "min_new_tokens": max_new_tokens,
                    "return_dict_in_generate": True,
                    "output_scores": True,
                    "use_cache": True,
                }
                static = model.generate(**generation_kwargs, **dtype_inputs, cache_implementation="static")
                max_cache_len = seq_length + max_new_tokens - 1  # the last token is never cached
                self.assertIsInstance(static.cache, StaticCache)
                self._check_static_cache_shapes(static.cache, batch_size, max_cache_len, config)
                dynamic = model.generate(**generation_kwargs, **dtype_inputs)
                self._check_similar_generate_outputs(dynamic, static)

    @pytest.mark.generate
    @require_optimum_quanto
    def test_generate_with_quant_cache(self):
        for model_class in self.all_generative_model_classes:
            config, inputs_dict = self.prepare_config_and_inputs_for_generate()
            model = self._make_model(model_class, config)
            generation_kwargs = {
                "max_new_tokens": 5,
                "cache_implementation": "quantized",
                "cache_config": {"backend": "quanto", "nbits": 4, "q_group_size": 8, "residual_length": 128},
                "return_dict_in_generate": True,
            }
            results = model.generate(**generation_kwargs, **inputs_dict)
            self.assertIsInstance(results.cache, Cache)
            with self.assertRaises(ValueError):
                model.generate(**inputs_dict, max_new_tokens=5, cache=DynamicCache(), cache_implementation="quantized")

    # ------------------------------------------------------------------ compile

    @pytest.mark.generate
    @pytest.mark.torch_compile_test
    def test_generate_compile_model_forward_fullgraph(self):
        """generate() with a static cache and a fullgraph-compiled forward equals eager generate() with the dynamic
        cache, for two different inputs of one shape (the second call must reuse the compiled forward)."""
        for model_class in self.all_generative_model_classes:
            if not model_class._can_compile_fullgraph:
                self.skipTest(reason="This model does not support the static cache format")
            config, inputs_dict = self.prepare_config_and_inputs_for_generate(batch_size=4)
            model = self._make_model(model_class, config)
            half = inputs_dict["input_ids"].shape[0] // 2
            inputs_1 = {k: v[:half] if isinstance(v, torch.Tensor) else v for k, v in inputs_dict.items()}
            inputs_2 = {k: v[half:] if isinstance(v, torch.Tensor) else v for k, v in inputs_dict.items()}
            generation_kwargs = {
                "do_sample": False,
                "max_new_tokens": 5,
                "min_new_tokens": 5,
                "return_dict_in_generate": True,
                "output_scores": True,
            }
            dynamic_outputs = [model.generate(**x, **generation_kwargs) for x in (inputs_1, inputs_2)]

            compile_config = CompileConfig(fullgraph=True, dynamic=False)
            compile_config._compile_all_devices = True  # compile on CPU too
            torch.compiler.reset()
            if hasattr(model, "_compiled_call"):
                del model._compiled_call
            static_outputs = []
            for x in (inputs_1, inputs_2):
                static_outputs.append(
                    model.generate(**x, **generation_kwargs, cache_implementation="static",
                                   compile_config=compile_config)
                )
                self.assertTrue(hasattr(model, "_compiled_call"), "generate() did not compile the forward")
            for dynamic, static in zip(dynamic_outputs, static_outputs):
                self._check_similar_generate_outputs(dynamic, static)

    # ------------------------------------------------------------------ misc contract

    @pytest.mark.generate
    def test_generate_methods_with_logits_to_keep(self):
        for model_class in self.all_generative_model_classes:
            if "logits_to_keep" not in set(inspect.signature(model_class.forward).parameters.keys()):
                self.skipTest(reason="This model does not support `logits_to_keep` argument.")
            config, inputs_dict = self.prepare_config_and_inputs_for_generate()
            config.use_cache = True
            config.is_decoder = True
            model = self._make_model(model_class, config)
            generation_kwargs = {"max_new_tokens": 10, "do_sample": False}
            with_all_logits = model.generate(**generation_kwargs, **inputs_dict, logits_to_keep=0)
            without_all_logits = model.generate(**inputs_dict, **generation_kwargs)
            self.assertEqual(with_all_logits.tolist(), without_all_logits.tolist())

    @pytest.mark.generate
    def test_assisted_decoding_with_logits_to_keep(self):
        for model_class in self.all_generative_model_classes:
            if "logits_to_keep" not in set(inspect.signature(model_class.forward).parameters.keys()):
                self.skipTest(reason="This model does not support `logits_to_keep` argument.")
            config, inputs_dict = self.prepare_config_and_inputs_for_generate(batch_size=1)
            config.use_cache = True
            config.is_decoder = True
            model = self._make_model(model_class, config)
            self._skip_stateful(model)
            assistant = model
            assistant.generation_config.num_assistant_tokens = 2
            assistant.generation_config.num_assistant_tokens_schedule = "constant"
            generation_kwargs = {
                "max_new_tokens": 10,
                "do_sample": False,
                "assistant_model": assistant,
                "return_dict_in_generate": True,
                "output_scores": True,
            }
            with_all_logits = model.generate(**generation_kwargs, **inputs_dict, logits_to_keep=0)
            without_all_logits = model.generate(**inputs_dict, **generation_kwargs)
            self._check_similar_generate_outputs(with_all_logits, without_all_logits)

    def test_inherits_generation_mixin(self):
        for model_class in self.all_generative_model_classes:
            self.assertTrue(issubclass(model_class, GenerationMixin))

    def test_prepare_inputs_for_generation_kwargs_forwards(self, **extra_kwargs):
        """Unknown keyword arguments pass through prepare_inputs_for_generation to the forward."""
        for model_class in self.all_generative_model_classes:
            config, _ = self.prepare_config_and_inputs_for_generate()
            model = self._make_model(model_class, config)
            input_ids = torch.tensor([[1, 2, 3], [4, 5, 6]], device=torch_device)
            position_ids = torch.tensor([[0, 1, 2], [0, 1, 2]], device=torch_device)
            marker = torch.tensor([1.0], device=torch_device)
            model_inputs = model.prepare_inputs_for_generation(
                input_ids, position_ids=position_ids, is_first_iteration=True, custom_kwarg=marker, **extra_kwargs
            )
            self.assertIn("custom_kwarg", model_inputs)
            self.assertIs(model_inputs["custom_kwarg"], marker)

    @pytest.mark.generate
    def test_generate_with_and_without_position_ids(self):
        for model_class in self.all_generative_model_classes:
            config, inputs_dict = self.prepare_config_and_inputs_for_generate()
            model = self._make_model(model_class, config)
            if "position_ids" not in inspect.signature(model.forward).parameters:
                self.skipTest(reason="This model doesn't take `position_ids`")
            # Left padding: with right padding (the common inputs' lower-triangular mask) the new tokens' positions
            # continue from a padded slot, whose position id is arbitrary, so the two calls would legitimately differ.
            inputs_dict["attention_mask"] = inputs_dict["attention_mask"].flip(-1)
            without_positions = model.generate(**inputs_dict, max_new_tokens=5, min_new_tokens=5)
            mask = inputs_dict["attention_mask"]
            position_ids = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)
            with_positions = model.generate(**inputs_dict, position_ids=position_ids, max_new_tokens=5,
                                            min_new_tokens=5)
            self.assertListEqual(without_positions.tolist(), with_positions.tolist())

    @pytest.mark.generate
    def test_generate_after_save_and_reload(self):
        """A saved and reloaded model generates what the original generates (weights, config and generation
        config round-trip)."""
        for model_class in self.all_generative_model_classes:
            config, inputs_dict = self.prepare_config_and_inputs_for_generate()
            model = self._make_model(model_class, config)
            before = model.generate(**inputs_dict, max_new_tokens=5, min_new_tokens=5, do_sample=False)
            with tempfile.TemporaryDirectory() as tmp:
                model.save_pretrained(tmp)
                reloaded = model_class.from_pretrained(tmp).to(torch_device).eval()
            after = reloaded.generate(**inputs_dict, max_new_tokens=5, min_new_tokens=5, do_sample=False)
            self.assertListEqual(before.tolist(), after.tolist())

    # ------------------------------------------------------------------ checks

    def _check_similar_generate_outputs(self, output_1, output_2, atol=1e-5, rtol=1e-5):
        """Equal sequences, or, where they first differ, near-equal scores (a near tie broken differently)."""
        decoder_input_length = output_1.sequences.shape[1] - len(output_1.scores)
        matches = output_1.sequences == output_2.sequences
        if matches.all():
            return
        for batch_idx in range(output_1.sequences.shape[0]):
            row = matches[batch_idx]
            if row.all():
                continue
            first_mismatch = int(row.int().argmin()) - decoder_input_length
            self.assertGreaterEqual(first_mismatch, 0, "the outputs differ inside the prompt")
            scores_1 = output_1.scores[first_mismatch][batch_idx]
            scores_2 = output_2.scores[first_mismatch][batch_idx]
            self.assertTrue(
                torch.allclose(scores_1, scores_2, atol=atol, rtol=rtol),
                f"generated sequences differ (row {batch_idx}, step {first_mismatch}) and the scores there are not "
                f"close: max abs diff {(scores_1 - scores_2).abs().max().item():.3e}",
            )

    def _check_generate_outputs(self, output, config, use_cache=False, num_return_sequences=1, num_beams=1):
        input_batch_size = int(output.sequences.shape[0] / num_return_sequences)
        internal_batch_size = input_batch_size * num_beams if num_beams > 1 else input_batch_size * num_return_sequences
        prompt_length = output.sequences.shape[1] - len(output.scores)
        config = config.get_text_config(decoder=True)

        self._check_scores(internal_batch_size, output.scores, prompt_length, config)
        self._check_logits(internal_batch_size, output.logits, config)
        if self.has_attentions and output.attentions is not None:
            self._check_attentions_for_generate(
                internal_batch_size, output.attentions, prompt_length, output.sequences.shape[1], config,
                output.cache if use_cache else None,
            )
        self._check_hidden_states_for_generate(
            internal_batch_size, output.hidden_states, prompt_length, output.sequences.shape[1], config, use_cache
        )
        if use_cache:
            self._check_past_key_values_for_generate(
                internal_batch_size, output.cache, output.sequences.shape[1] - 1, config
            )
        else:
            self.assertIsNone(output.cache, "generate(use_cache=False) returned a cache")

    def _check_scores(self, batch_size, scores, prompt_length, config):
        vocab_size = config.get_text_config(decoder=True).vocab_size
        self.assertIsInstance(scores, tuple)
        for step_scores in scores:
            self.assertEqual(step_scores.shape, (batch_size, vocab_size))

    def _check_logits(self, batch_size, logits, config):
        vocab_size = config.get_text_config(decoder=True).vocab_size
        self.assertIsInstance(logits, tuple)
        for step_logits in logits:
            self.assertEqual(step_logits.shape[0], batch_size)
            self.assertEqual(step_logits.shape[-1], vocab_size)

    def _check_attentions_for_generate(self, batch_size, attentions, prompt_length, output_length, config,
                                       past_key_values):
        self.assertIsInstance(attentions, tuple)
        self.assertListEqual([isinstance(a, tuple) for a in attentions], [True] * len(attentions))
        self.assertEqual(len(attentions), output_length - prompt_length)
        use_cache = past_key_values is not None
        has_static_cache = isinstance(past_key_values, StaticCache)
        for generated_length, iter_attentions in enumerate(attentions):
            model_input_length = 1 if use_cache and generated_length > 0 else prompt_length + generated_length
            key_length = prompt_length + generated_length
            if has_static_cache:
                key_length = past_key_values.get_max_cache_shape()
            expected_shape = (batch_size, self._attention_map_heads(config), model_input_length, key_length)
            self.assertListEqual(
                [tuple(layer_attention.shape) for layer_attention in iter_attentions],
                [expected_shape] * len(iter_attentions),
            )

    def _check_hidden_states_for_generate(self, batch_size, hidden_states, prompt_length, output_length, config,
                                          use_cache=False):
        self.assertIsInstance(hidden_states, tuple)
        self.assertListEqual([isinstance(h, tuple) for h in hidden_states], [True] * len(hidden_states))
        self.assertEqual(len(hidden_states), output_length - prompt_length)
        for generated_length, iter_hidden_states in enumerate(hidden_states):
            model_input_length = 1 if use_cache and generated_length > 0 else prompt_length + generated_length
            expected_shape = (batch_size, model_input_length, config.hidden_size)
            self.assertEqual(len(iter_hidden_states), config.num_hidden_layers + 1)
            self.assertListEqual(
                [tuple(layer_hidden.shape) for layer_hidden in iter_hidden_states],
                [expected_shape] * len(iter_hidden_states),
            )

    def _attention_map_heads(self, config):
        """Heads per returned attention map. A model whose attention runs over other heads than its projections'
        overrides this and ``_kv_shape_params``, as transformers' DeepseekV3ModelTest overrides its cache check for
        MLA's key and value widths."""
        return config.get_text_config(decoder=True).num_attention_heads

    def _kv_shape_params(self, config):
        """(key/value heads, key width, value width) of an attention cache layer."""
        config = config.get_text_config(decoder=True)
        num_heads = config.num_attention_heads
        num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
        return num_kv_heads, head_dim, head_dim

    def _check_past_key_values_for_generate(self, batch_size, past_key_values, seq_length, config):
        """A `Cache` with one layer per decoder layer: attention layers hold keys and values of shape
        `[batch, num_key_value_heads, seq_len (or the sliding window), head_dim]`; linear-attention layers hold
        their conv / recurrent states with the batch dimension first."""
        self.assertIsInstance(past_key_values, Cache)
        text_config = config.get_text_config(decoder=True)
        self.assertEqual(len(past_key_values.layers), text_config.num_hidden_layers)
        num_kv_heads, key_dim, value_dim = self._kv_shape_params(config)
        for layer_idx, layer in enumerate(past_key_values.layers):
            if isinstance(layer, LinearAttentionCacheLayerMixin):
                states = [s for s in list(layer.conv_states.values()) + list(layer.recurrent_states.values()) if s is not None]
                self.assertTrue(states, f"linear-attention cache layer {layer_idx} holds no state")
                for state in states:
                    self.assertEqual(state.shape[0], batch_size, f"cache layer {layer_idx}: batch dimension")
            if not _is_linear_only(layer):
                self.assertTrue(_has_kv(layer), f"attention cache layer {layer_idx} holds no keys")
                expected_len = seq_length
                window = getattr(layer, "sliding_window", None)
                if getattr(layer, "is_sliding", False) and window is not None:
                    # DynamicSlidingWindowLayer keeps window - 1 tokens (and the whole prompt right after prefill).
                    expected_len = layer.keys.shape[-2] if seq_length >= window else seq_length
                expected = (batch_size, num_kv_heads, expected_len)
                self.assertEqual(tuple(layer.keys.shape), (*expected, key_dim), f"cache layer {layer_idx}: keys")
                self.assertEqual(tuple(layer.values.shape), (*expected, value_dim), f"cache layer {layer_idx}: values")

    def _check_static_cache_shapes(self, cache, batch_size, max_cache_len, config):
        text_config = config.get_text_config(decoder=True)
        self.assertEqual(len(cache.layers), text_config.num_hidden_layers)
        num_kv_heads, key_dim, _ = self._kv_shape_params(config)
        checked = 0
        for layer_idx, layer in enumerate(cache.layers):
            if _is_linear_only(layer):
                continue
            keys = layer.keys
            expected_len = max_cache_len
            if getattr(layer, "is_sliding", False):
                expected_len = min(max_cache_len, keys.shape[-2])
            self.assertEqual(tuple(keys.shape), (batch_size, num_kv_heads, expected_len, key_dim),
                             f"static cache layer {layer_idx}: keys")
            checked += 1
        self.assertGreater(checked + sum(_is_linear_only(layer) for layer in cache.layers), 0)

    def _check_caches_are_equal(self, cache1, cache2):
        self.assertIsInstance(cache1, Cache)
        self.assertIsInstance(cache2, Cache)
        self.assertEqual(type(cache1), type(cache2))
        self.assertEqual(len(cache1.layers), len(cache2.layers))
        for idx, (layer1, layer2) in enumerate(zip(cache1.layers, cache2.layers)):
            if isinstance(layer1, LinearAttentionCacheLayerMixin):
                for s1, s2 in zip(list(layer1.conv_states.values()) + list(layer1.recurrent_states.values()),
                                  list(layer2.conv_states.values()) + list(layer2.recurrent_states.values())):
                    if s1 is None or s2 is None:
                        self.assertIs(s1, s2, f"cache layer {idx}: a state is missing on one side")
                        continue
                    torch.testing.assert_close(s1, s2, msg=lambda m: f"cache layer {idx} (linear state): {m}")
            if _has_kv(layer1) or _has_kv(layer2):
                torch.testing.assert_close(layer1.keys, layer2.keys, msg=lambda m: f"cache layer {idx} keys: {m}")
                torch.testing.assert_close(layer1.values, layer2.values,
                                           msg=lambda m: f"cache layer {idx} values: {m}")


__all__ = ["GenerationTesterMixin"]
