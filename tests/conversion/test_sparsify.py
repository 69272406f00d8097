"""Sparse-attention conversion: Flux starts equal to its source, every source weight is copied, bad options fail
clearly, and a gates checkpoint (gates only, adapter-style) round-trips onto its base and refuses another base."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from hf_arch.cli import main
from hf_arch.conversion import SparsifyOptions, convert, load_gates, max_abs_logit_diff, save_gates, sparsify
from hf_arch.layers.sparse_attention import attention_density, sparse_attention_layers


def _source(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _ids(length=96, seed=0):
    return torch.randint(0, 512, (2, length), generator=torch.Generator().manual_seed(seed))


def test_flux_conversion_equals_the_source_and_copies_every_weight(stories260k):
    source = _source(stories260k)
    target = sparsify(source, SparsifyOptions(method="flux", block_size=16))
    assert target.config.model_type == "hfa_sparse_attention" and target.config.sparse_attn_method == "flux"
    src, dst = source.state_dict(), target.state_dict()
    for name, tensor in src.items():
        assert torch.equal(dst[name], tensor), name
    new = set(dst) - set(src)
    assert new and all(".layer_router." in n or n == "model.sparsity_multipliers" for n in new)
    assert max_abs_logit_diff(source, target, _ids()) == 0.0


def test_seer_conversion_prefills_sparsely_once_the_context_holds_blocks(stories260k):
    source = _source(stories260k)
    target = sparsify(source, SparsifyOptions(method="seer", block_size=16, selection="topk", topk=1))
    assert max_abs_logit_diff(source, target, _ids(length=12)) < 1e-5  # shorter than a block: dense
    with torch.no_grad():
        out = target(_ids())
    assert attention_density(out) < 1.0
    assert all(layer.block_gate is not None for layer in sparse_attention_layers(target))


@pytest.mark.parametrize("options, message", [
    (dict(method="quest"), "method must be one of ('seer', 'flux', 'delta')"),
    (dict(method="seer", block_size=0), "sparse_attn_block_size must be an integer >= 1"),
    (dict(method="seer", selection="random"), "sparse_attn_selection must be one of"),
    (dict(method="flux", target_sparsity=1.5), "sparse_attn_target_sparsity must be in [0, 1]"),
])
def test_bad_options_fail_clearly(stories260k, tmp_path, options, message):
    with pytest.raises(ValueError) as err:
        convert(stories260k, tmp_path / "out", to="sparse_attention", **options)
    assert message in str(err.value)
    assert not (tmp_path / "out").exists()


def test_gates_round_trip_onto_their_base_and_refuse_another(stories260k, tmp_path):
    source = _source(stories260k)
    model = sparsify(source, SparsifyOptions(method="seer", block_size=16, selection="topk", topk=2))
    with torch.no_grad():  # stand-in for training: gates that differ from a fresh init
        for layer in sparse_attention_layers(model):
            layer.block_gate.q_map.add_(torch.randn_like(layer.block_gate.q_map))
    ids = _ids()
    with torch.no_grad():
        expected = model(ids).logits

    out = save_gates(model, tmp_path / "gates", base_model=str(stories260k))
    record = json.loads((out / "gates_config.json").read_text())
    assert record["base_model"] == str(stories260k) and record["sparse_attention"]["sparse_attn_topk"] == 2
    assert all(".block_gate." in name for name in record["parameters"])
    assert (out / "gates.safetensors").stat().st_size < 0.2 * sum(p.numel() * 4 for p in source.parameters())
    with pytest.raises(FileExistsError):
        save_gates(model, out, base_model=str(stories260k))

    loaded = load_gates(out)  # the base comes from the pointer
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, expected, rtol=0, atol=0)

    altered = _source(stories260k)
    with torch.no_grad():
        altered.model.layers[1].self_attn.q_proj.weight.mul_(1.1)
    with pytest.raises(ValueError, match="do not match the base model.*attention weights differ"):
        load_gates(out, base_model=altered)
    config = source.config.to_dict() | {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4,
                                        "num_key_value_heads": 4, "head_dim": 8}
    other = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in config.items() if k in LlamaConfig().to_dict()}))
    with pytest.raises(ValueError, match="hidden_size: gates were trained on 64, this base has 32"):
        load_gates(out, base_model=other)
    with pytest.raises(FileNotFoundError, match="gates_config.json is missing"):
        load_gates(tmp_path)

    # The CLI: export from a saved model, apply onto the recorded base.
    model.save_pretrained(tmp_path / "trained")
    assert main(["gates", "export", str(tmp_path / "trained"), str(tmp_path / "cli_gates"), "--base",
                 str(stories260k)]) == 0
    assert main(["gates", "apply", str(tmp_path / "cli_gates"), str(tmp_path / "applied")]) == 0
    applied = AutoModelForCausalLM.from_pretrained(tmp_path / "applied").eval()
    assert (tmp_path / "applied" / "tokenizer_config.json").is_file()
    with torch.no_grad():
        torch.testing.assert_close(applied(ids).logits, expected, rtol=0, atol=0)


def test_cli_converts_to_flux_and_records_an_exact_start(stories260k, tmp_path, capsys):
    assert main(["convert", str(stories260k), str(tmp_path / "flux"), "--to", "sparse_attention", "--method", "flux",
                 "--block-size", "16", "--window-blocks", "2", "--target-sparsity", "0.3", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["max_abs_logit_diff"] == 0.0 and record["options"]["window_blocks"] == 2
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "flux")
    assert loaded.config.sparse_attn_target_sparsity == 0.3 and loaded.config.sparse_attn_window_blocks == 2
