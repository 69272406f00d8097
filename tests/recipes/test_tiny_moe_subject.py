"""The tiny transformers Qwen3-MoE that `hf-arch bench modes --train-tiny-qwen3-moe` trains: a plain transformers
checkpoint (no hf-arch code), its training and held-out stories written beside it, never the same story."""

from __future__ import annotations

import json


def test_trains_saves_and_splits_the_stories(tmp_path, assets, monkeypatch):
    from transformers import AutoModelForCausalLM

    from hf_arch.recipes.tiny_moe_subject import train_tiny_qwen3_moe

    monkeypatch.setenv("HF_ARCH_ASSETS", str(assets))
    out = train_tiny_qwen3_moe(tmp_path / "q3", steps=2)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "qwen3_moe" and "auto_map" not in config
    model = AutoModelForCausalLM.from_pretrained(out)
    assert type(model).__name__ == "Qwen3MoeForCausalLM"
    train = (out / "train.txt").read_text().split("<|endoftext|>")
    held = (out / "heldout.txt").read_text().split("<|endoftext|>")
    assert len(held) > 10 and len(train) > 10 * len(held)
    assert not set(held) & set(train)
