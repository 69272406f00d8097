"""``--to tokenformer --grow N`` (issue 22 item 5): the grown model computes exactly what the source did, records the
pinned scales, trains on from there (the new tokens move); sources and sizes that cannot grow are refused."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import hf_arch
from hf_arch.cli import main
from hf_arch.conversion.tokenformer_growth import TokenFormerGrowthOptions, grow_tokenformer

SHAPE = dict(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)
ROWS = torch.randint(0, 61, (8, 16), generator=torch.Generator().manual_seed(1))


@pytest.fixture()
def trained(tmp_path):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(hf_arch.TokenFormerConfig(**SHAPE)).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(5):  # a model that has trained, so nothing is at its init
        optimizer.zero_grad()
        model(ROWS, labels=ROWS).loss.backward()
        optimizer.step()
    model.eval().save_pretrained(tmp_path / "small")
    return model, tmp_path


@torch.no_grad()
def test_growth_keeps_the_function_exactly_and_records_the_scales(trained):
    small, tmp_path = trained
    out = tmp_path / "grown"
    assert main(["convert", str(tmp_path / "small"), str(out), "--to", "tokenformer", "--grow", "8",
                 "--grow-ffn", "16"]) == 0
    grown = AutoModelForCausalLM.from_pretrained(out).eval()
    assert grown.config.mixer_options["pattention"] == {"attention_param_tokens": 40, "attention_scale_tokens": 32,
                                                        "ffn_param_tokens": 64, "ffn_scale_tokens": 48}
    assert grown.model.layers[1].self_attn.output_tokens.param_tokens == 40
    assert grown.model.layers[1].mlp.ffn.param_tokens == 64
    torch.testing.assert_close(grown(ROWS).logits, small(ROWS).logits, rtol=0, atol=1e-6)
    new_values = grown.model.layers[0].mlp.ffn.value_param_tokens[48:]
    assert new_values.abs().sum() > 0 and not grown.model.layers[0].mlp.ffn.key_param_tokens[48:].any()
    record = json.loads((out / "hf_arch_conversion.json").read_text())
    assert record["max_abs_logit_diff"] <= 1e-6
    # Grown again: the scales stay at the first counts.
    twice = grow_tokenformer(grown, TokenFormerGrowthOptions(grow=4))
    assert twice.config.mixer_options["pattention"]["attention_scale_tokens"] == 32
    torch.testing.assert_close(twice(ROWS).logits, small(ROWS).logits, rtol=0, atol=1e-6)


def test_training_continues_and_moves_the_new_tokens(trained):
    small, _ = trained
    grown = grow_tokenformer(small, TokenFormerGrowthOptions(grow=8)).train()
    keys = grown.model.layers[0].self_attn.query_tokens.key_param_tokens
    optimizer = torch.optim.AdamW(grown.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        optimizer.zero_grad()
        loss = grown(ROWS, labels=ROWS).loss
        loss.backward()
        losses.append(loss.item())
        optimizer.step()
    assert keys[32:].abs().sum() > 0  # GeLU'(0) = 1/2 and nonzero new values: the zero keys move at once
    assert losses[-1] < losses[0]


def test_what_cannot_grow_is_refused_by_name(trained, stories260k, tmp_path):
    small, _ = trained
    with pytest.raises(ValueError, match="nothing to add"):
        grow_tokenformer(small, TokenFormerGrowthOptions(grow=0))
    with pytest.raises(ValueError, match="grow must be an integer >= 0"):
        grow_tokenformer(small, TokenFormerGrowthOptions(grow=-2))
    assert main(["convert", str(stories260k), str(tmp_path / "x"), "--to", "tokenformer", "--grow", "4"]) == 2
