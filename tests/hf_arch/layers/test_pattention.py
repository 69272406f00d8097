"""TokenFormer's Pattention (issue 22 item 5): Θ is GeLU then an L2 normalisation over the parameter tokens times
√n₀; zero key tokens weigh nothing; the mixers build from ``mixer_options["pattention"]`` and refuse bad counts."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

import hf_arch
from hf_arch.layers.pattention import Pattention

SHAPE = dict(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2)


def pattention(tokens=12, scale=12):
    torch.manual_seed(0)
    layer = Pattention(8, 6, tokens, scale)
    layer.init_parameters(torch.nn.init)
    return layer


@torch.no_grad()
def test_theta_is_gelu_then_l2_over_the_tokens_times_the_scale():
    layer = pattention(tokens=12, scale=7)
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(1))
    scores = F.gelu(x @ layer.key_param_tokens.T)
    expected = scores / scores.norm(dim=-1, keepdim=True) * math.sqrt(7) @ layer.value_param_tokens
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_zero_tokens_added_with_the_scale_kept_change_nothing():
    small = pattention(tokens=12, scale=12)
    big = Pattention(8, 6, 20, 12)
    big.key_param_tokens.copy_(torch.cat([small.key_param_tokens, torch.zeros(8, 8)]))
    big.value_param_tokens.copy_(torch.cat([small.value_param_tokens, torch.randn(8, 6)]))  # any values
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(big(x), small(x), rtol=0, atol=1e-7)  # the new tokens weigh exactly 0
    rescaled = Pattention(8, 6, 20, 20)  # what √n with the new count would do instead
    rescaled.load_state_dict(big.state_dict())
    torch.testing.assert_close(rescaled(x), small(x) * math.sqrt(20 / 12), rtol=1e-5, atol=1e-6)


def test_the_model_has_no_linear_projection_in_its_blocks(model_checks, tmp_path):
    torch.manual_seed(0)
    config = hf_arch.TokenFormerConfig(**SHAPE, mixer_options={"pattention": {"attention_param_tokens": 16,
                                                                              "ffn_param_tokens": 24}})
    model = AutoModelForCausalLM.from_config(config).eval()
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert linears == ["lm_head"]
    layer = model.model.layers[0]
    assert layer.self_attn.query_tokens.param_tokens == 16 and layer.mlp.ffn.param_tokens == 24
    rows = torch.randint(0, 61, (8, 16), generator=torch.Generator().manual_seed(3))
    model_checks.trains(model, rows)
    model_checks.decodes_like_the_full_forward(model, rows[:2, :12], prefix=5)
    model_checks.round_trips(model, rows[:2, :12], tmp_path)


@pytest.mark.parametrize("options, message", [
    ({"attention_param_tokens": 0}, "attention_param_tokens must be an integer >= 1 or None"),
    ({"ffn_scale_tokens": 1.5}, "ffn_scale_tokens must be an integer >= 1 or None"),
    ({"experts": 2}, "unknown options ['experts']"),
])
def test_bad_options_are_refused_by_name(options, message):
    with pytest.raises(ValueError) as err:
        AutoModelForCausalLM.from_config(hf_arch.TokenFormerConfig(**SHAPE, mixer_options={"pattention": options}))
    assert message in str(err.value)


def test_projection_biases_are_refused():
    with pytest.raises(ValueError, match="TokenFormer's projections are parameter tokens, with no bias"):
        AutoModelForCausalLM.from_config(hf_arch.TokenFormerConfig(**SHAPE, attention_bias=True))
