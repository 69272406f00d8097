"""Model card rendering and writing."""

from __future__ import annotations

import json
import os

import pytest
from huggingface_hub import ModelCard

from hf_arch.model_cards.card import render_model_card, write_model_card

CONVERSION = {
    "source": "stas/tiny-random-llama-2",
    "source_model_type": "llama",
    "source_architecture": "LlamaForCausalLM",
    "variant": "gated_attention",
    "options": {"gate": "elementwise", "init": "zero"},
    "versions": {"hf_arch": "0.1.0"},
    "new_parameters": ["model.layers.0.self_attn.output_gate.proj.weight"],
    "max_abs_logit_diff": 1.5e-6,
    "created": "2025-01-01T00:00:00+00:00",
}
TRAINING = {
    "recipe": {"data": {"train_file": "/data/tinystories-train.txt"}, "training": {"mode": "new_params", "max_steps": 30}},
    "summary": {"steps": 30, "loss_start": 5.25, "loss_end": 3.125, "mode": "new_params"},
}
EVAL = {
    "before": {"perplexity": {"file": "val.txt", "tokens": 512, "ppl": 41.25, "nll": 3.72},
               "tasks": {"hellaswag": {"n": 50, "acc": 0.26, "acc_norm": 0.28}}},
    "after": {"perplexity": {"file": "val.txt", "tokens": 512, "ppl": 30.5, "nll": 3.42},
              "tasks": {"hellaswag": {"n": 50, "acc": 0.3, "acc_norm": 0.34}}},
}


def _model_dir(tmp_path, config: dict, **records):
    directory = tmp_path / "model"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(config))
    for name, record in records.items():
        (directory / f"hf_arch_{name}.json").write_text(json.dumps(record))
    return directory


GATED_CONFIG = {"model_type": "hfa_gated_attention", "architectures": ["GatedAttentionForCausalLM"]}


def test_card_with_all_records(tmp_path):
    directory = _model_dir(tmp_path, GATED_CONFIG, conversion=CONVERSION, training=TRAINING, eval=EVAL)
    text = render_model_card(directory, repo_id="me/tiny-gated")
    card = ModelCard(text)
    data = card.data.to_dict()
    assert data["base_model"] == "stas/tiny-random-llama-2"
    assert data["library_name"] == "transformers"
    assert data["pipeline_tag"] == "text-generation"
    assert data["license"] == "other"
    assert data["tags"] == ["hf-arch", "gated-attention", "hfa_gated_attention"]
    assert data["datasets"] == ["tinystories-train.txt"]
    body = card.text
    assert "Gated Attention for Large Language Models" in body  # paper
    assert "1.5e-06" in body and "`elementwise`" in body  # conversion
    assert "5.25 → 3.125" in body and "new_params" in body  # training
    assert "| Metric | Before | After |" in body
    assert "| perplexity (val.txt) | 41.25 | 30.5 |" in body
    assert "| hellaswag acc_norm, n=50 | 0.28 | 0.34 |" in body
    assert "pip install hf-arch" in body and "import hf_arch" in body
    assert 'AutoModelForCausalLM.from_pretrained("me/tiny-gated")' in body
    assert "trust_remote_code" not in body  # no auto_map in config.json


def test_card_without_records(tmp_path):
    directory = _model_dir(tmp_path, {"model_type": "hfa_gated_attention", "auto_map": {"AutoConfig": "x.Config"}})
    card = ModelCard(render_model_card(directory))
    data = card.data.to_dict()
    assert data["license"] == "other"
    assert "base_model" not in data and "datasets" not in data
    assert data["tags"] == ["hf-arch", "gated-attention", "hfa_gated_attention"]
    assert "## Conversion" not in card.text and "## Training" not in card.text and "## Evaluation" not in card.text
    assert "trust_remote_code=True" in card.text


def test_card_plain_eval_record_and_local_source(tmp_path):
    conversion = dict(CONVERSION, source=str(tmp_path), license="apache-2.0")
    plain_eval = EVAL["after"]
    directory = _model_dir(tmp_path, {"model_type": "llama"}, conversion=conversion, eval=plain_eval)
    card = ModelCard(render_model_card(directory))
    data = card.data.to_dict()
    assert data["license"] == "apache-2.0"
    assert "base_model" not in data  # a local path is not a Hub id: body only
    assert f"`{tmp_path}`" in card.text
    assert "| Metric | Value |" in card.text and "| perplexity (val.txt) | 30.5 |" in card.text


def test_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        render_model_card(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "config.json")):
        render_model_card(tmp_path)


def test_write_refuses_overwrite_and_is_atomic(tmp_path, monkeypatch):
    directory = _model_dir(tmp_path, GATED_CONFIG, conversion=CONVERSION)
    path = write_model_card(directory)
    assert path == directory / "README.md"
    first = path.read_text()
    assert first.startswith("---\n") and "stas/tiny-random-llama-2" in first

    with pytest.raises(FileExistsError, match="overwrite=True"):
        write_model_card(directory)
    assert path.read_text() == first

    # A failure while writing leaves the old README.md untouched and no temp file behind.
    def broken_fsync(fd):
        raise OSError("disk full")

    path.write_text("old card")
    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="disk full"):
        write_model_card(directory, overwrite=True)
    assert path.read_text() == "old card"
    monkeypatch.undo()
    assert sorted(p.name for p in directory.iterdir()) == ["README.md", "config.json", "hf_arch_conversion.json"]

    write_model_card(directory, overwrite=True)
    assert path.read_text() == first
    assert sorted(p.name for p in directory.iterdir()) == ["README.md", "config.json", "hf_arch_conversion.json"]


def test_card_lists_moe_and_hybrid_structure(tmp_path):
    config = {"model_type": "hfa_moe", "architectures": ["MoEForCausalLM"],
              "layer_types": ["linear_attention", "full_attention", "linear_attention"],
              "mlp_layer_types": ["dense", "sparse", "sparse"], "moe_expert_pool": "global", "moe_pool_size": 6,
              "moe_router": "norm_router", "num_experts_per_tok": 2, "moe_intermediate_size": 64,
              "moe_zero_experts": 1, "moe_copy_experts": 0, "moe_constant_experts": 2, "moe_gating_residual": True,
              "moe_preset": "unipool"}
    text = render_model_card(_model_dir(tmp_path, config))
    assert "## Architecture" in text
    assert "Token mixers: 2 × `linear_attention`, 1 × `full_attention`" in text
    assert ("Mixture of Experts in 2 of 3 layers: one global pool of 6 FFN experts shared by all sparse layers, "
            "router `norm_router` (top-2), expert width 64") in text
    assert "Zero-computation experts (MoE++): 1 zero, 2 constant; gating residuals" in text
    assert "Preset: `unipool`" in text
    (tmp_path / "gated").mkdir()
    plain = render_model_card(_model_dir(tmp_path / "gated", GATED_CONFIG))
    assert "## Architecture" not in plain


def test_card_describes_learned_sparse_attention(tmp_path):
    seer = {"model_type": "hfa_sparse_attention", "architectures": ["SparseAttentionForCausalLM"],
            "sparse_attn_method": "seer", "sparse_attn_block_size": 64, "sparse_attn_selection": "topk",
            "sparse_attn_topk": 8}
    text = render_model_card(_model_dir(tmp_path, seer))
    assert "SeerAttention block gates (blocks of 64 tokens): prefill computes the key blocks the gate selects " \
           "(top-8 key blocks; first and diagonal block always kept)" in text
    flux = {**seer, "sparse_attn_method": "flux", "sparse_attn_sink_blocks": 1, "sparse_attn_window_blocks": 4,
            "sparse_attn_target_sparsity": 0.5}
    (tmp_path / "flux").mkdir()
    text = render_model_card(_model_dir(tmp_path / "flux", flux))
    assert "Flux layer routers: per input, each attention layer runs full attention or 1 sink + 4 local blocks " \
           "of 64 tokens (target sparse share 0.5)" in text
