"""Tiny random source models of every supported family, for conversion tests.

A test that takes ``source_name`` runs once per family; ``random_source(name)`` builds the model (random norms and
biases too, so a dropped tensor shows in the logits).
"""

from __future__ import annotations

import pytest
import torch
from transformers import (
    AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig, MistralConfig, Olmo2Config, Olmo3Config, Phi3Config,
    Qwen2Config, Qwen3Config,
)

SOURCE_DIMS = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)
SOURCE_CONFIGS = {
    "llama": (LlamaConfig, dict(rope_parameters={"rope_type": "default", "rope_theta": 5000.0})),
    "llama_bias_tied": (LlamaConfig, dict(attention_bias=True, mlp_bias=True, tie_word_embeddings=True)),
    "llama3_rope": (LlamaConfig, dict(
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 32})),
    "mistral_window": (MistralConfig, dict(sliding_window=8)),
    "qwen2": (Qwen2Config, {}),
    "qwen2_sliding_layers": (Qwen2Config, dict(use_sliding_window=True, sliding_window=8, max_window_layers=1)),
    "qwen3": (Qwen3Config, dict(head_dim=16, attention_bias=True)),
    "olmo2": (Olmo2Config, dict(attention_bias=True, pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    "olmo3_window": (Olmo3Config, dict(sliding_window=8, layer_types=["sliding_attention", "sliding_attention",
                                                                     "full_attention"],
                                       pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    "gemma3": (Gemma3TextConfig, dict(head_dim=8, query_pre_attn_scalar=12, sliding_window=8,
                                      layer_types=["sliding_attention", "sliding_attention", "full_attention"])),
    "phi3_window": (Phi3Config, dict(sliding_window=8, tie_word_embeddings=True, pad_token_id=None, bos_token_id=1,
                                     eos_token_id=2)),  # fused qkv / gate-up projections
}


def make_random_source(name: str):
    config_class, extra = SOURCE_CONFIGS[name]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config_class(**SOURCE_DIMS, **extra)).eval()
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if "norm" in param_name or param_name.endswith("bias"):
                param.normal_(1.0 if "norm" in param_name else 0.0, 0.5)
    return model


def pytest_generate_tests(metafunc):
    if "source_name" in metafunc.fixturenames:
        metafunc.parametrize("source_name", sorted(SOURCE_CONFIGS))


@pytest.fixture
def random_source():
    return make_random_source


@pytest.fixture
def source_dims():
    return dict(SOURCE_DIMS)
