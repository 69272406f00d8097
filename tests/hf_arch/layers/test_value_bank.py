"""MoVE: the shared value bank is mixed into every attention layer's values as the formula says, inserts exactly into
a checkpoint, decodes like the full forward, trains, and refuses a bank of size 0."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from hf_arch import MoVEConfig, MoVEForCausalLM
from hf_arch.cli import main
from hf_arch.conversion import ValueBankInsertionOptions, insert_value_bank, max_abs_logit_diff

BASE = dict(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2)


def test_values_gain_the_scaled_soft_mix_of_the_shared_bank():
    torch.manual_seed(0)
    model = MoVEForCausalLM(MoVEConfig(move_num_slots=5, move_init="normal", initializer_range=0.3, **BASE)).eval()
    assert model.model.value_bank.weight.shape == (5, 2 * 16)  # stored once, not per layer
    hidden = torch.randn(2, 7, 64)
    attn = model.model.layers[1].self_attn
    with torch.no_grad():
        _, _, value = attn.project(hidden, model.model.value_bank)
        plain = attn.v_proj(hidden).view(2, 7, 2, 16)
        weights = torch.softmax(hidden @ attn.value_gate.router.T, dim=-1)  # [B, T, slots]
        scale = hidden @ attn.value_gate.scale.T  # [B, T, H_kv]
        expected = plain + scale[..., None] * (weights @ model.model.value_bank.weight).view(2, 7, 2, 16)
    assert (expected - plain).abs().max() > 0.05
    torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="no value bank was passed"):
        attn.project(hidden)


def test_insertion_is_exact_then_decodes_like_the_full_forward_and_trains(stories260k, tmp_path, capsys):
    source = AutoModelForCausalLM.from_pretrained(stories260k, dtype=torch.float32).eval()
    target = insert_value_bank(source, ValueBankInsertionOptions(slots=8))
    ids = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(0))
    assert max_abs_logit_diff(source, target, ids) == 0.0
    with torch.no_grad():
        for layer in target.model.layers:
            layer.self_attn.value_gate.scale.normal_(std=0.3)
    assert max_abs_logit_diff(source, target, ids) > 1e-2  # the bank now matters
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[1, :3] = 0
    gen = target.generate(ids[:, :16], attention_mask=mask, max_new_tokens=5, do_sample=False, output_logits=True,
                          return_dict_in_generate=True)
    with torch.no_grad():
        full = target(gen.sequences, attention_mask=torch.cat([mask, torch.ones(2, 5, dtype=torch.long)], 1)).logits
    for step, logits in enumerate(gen.logits):
        torch.testing.assert_close(logits, full[:, 15 + step], rtol=1e-4, atol=1e-4)
    target.train()
    target(ids, labels=ids).loss.backward()
    assert target.model.value_bank.weight.grad.abs().sum() > 0

    assert main(["convert", str(stories260k), str(tmp_path / "move"), "--to", "move", "--slots", "4", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["max_abs_logit_diff"] == 0.0
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "move").config.move_num_slots == 4


def test_a_bank_of_size_zero_is_refused():
    with pytest.raises(ValueError, match="a MoVE bank of size 0 holds nothing"):
        MoVEConfig(move_num_slots=0, **BASE)
    with pytest.raises(ValueError, match="slots must be an integer >= 1"):
        ValueBankInsertionOptions(slots=0).config_overrides()
