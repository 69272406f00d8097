"""`hf-arch bench scratch` on a tiny budget: a Llama baseline and two variants trained from scratch on the same
TinyStories blocks; parameter matching; unregistered model types, stale results and time budgets handled."""

from __future__ import annotations

import json
import math

import pytest
from hf_arch.recipes import scratch_comparison as scratch

from hf_arch.cli import main

TINY = ["--hidden-size", "32", "--num-layers", "2", "--intermediate-size", "64", "--steps", "2", "--block-size", "32",
        "--batch-size", "2", "--val-blocks", "2", "--eval-every", "1", "--log-every", "1"]


def test_match_intermediate_size_picks_the_closest_count():
    # 1000 + 7·I against 1500: I=71 gives 1497 (3 short), I=72 gives 1504 (4 over).
    assert scratch.match_intermediate_size(lambda i: 1000 + 7 * i, 1500, start=8) == 71
    # Ties go to the smaller size; a count already past the target at size 1 gives 1.
    assert scratch.match_intermediate_size(lambda i: 10 * i, 15, start=4) == 1
    assert scratch.match_intermediate_size(lambda i: 10**6 + i, 50, start=4) == 1


def test_variants_are_matched_to_the_baseline_parameter_count():
    import hf_arch  # noqa: F401

    class Dims:
        hidden_size, num_layers, num_heads, num_kv_heads, block_size = 64, 2, 4, 2, 64

    shared = scratch.shared_dims(Dims, vocab_size=512)
    _, baseline = scratch.matched_config(scratch.model_spec("llama"), shared, 0, 192)
    config, params = scratch.matched_config(scratch.model_spec("gated_attention"), shared, baseline, 192)
    # The elementwise gate adds hidden² per layer; a narrower MLP (3·hidden per unit and layer) pays for it, to
    # within half a unit.
    assert config.intermediate_size < 192 and abs(params - baseline) <= 2 * 3 * 64 / 2
    assert config.attn_output_gate == "elementwise" and not config.tie_word_embeddings


def test_unmatchable_parameter_count_is_refused():
    import hf_arch  # noqa: F401

    class Dims:
        hidden_size, num_layers, num_heads, num_kv_heads, block_size = 64, 2, 4, 2, 64

    shared = scratch.shared_dims(Dims, vocab_size=512)
    # A move bank far larger than the baseline cannot be paid for by any intermediate size >= 1.
    spec = scratch.ModelSpec("huge_move", "hfa_move", {"move_num_slots": 4096})
    with pytest.raises(scratch.ScratchComparisonError, match="tolerance 2%"):
        scratch.matched_config(spec, shared, 60_000, 192)


def test_unregistered_model_type_is_a_clear_error(tmp_path, monkeypatch):
    table = {**scratch.VARIANTS, "not_yet": ("hfa_not_written_yet", {})}
    with pytest.raises(scratch.ScratchComparisonError, match="'hfa_not_written_yet' is not registered"):
        scratch.model_spec("not_yet", table)
    monkeypatch.setattr(scratch, "VARIANTS", table)
    monkeypatch.setattr(scratch, "MODELS", {**table, **scratch.RATIO_VARIANTS})
    # Refused before any data is read or any model trained.
    with pytest.raises(SystemExit, match="not registered with transformers.*--variants"):
        main(["bench", "scratch", "--out", str(tmp_path / "x"), "--variants", "llama", "not_yet"])
    assert not (tmp_path / "x").exists()
    # Recall probes longer than the trained length (the models' max_position_embeddings) or with more pairs than
    # fit: refused before training, not after it.
    with pytest.raises(SystemExit, match="--recall-lengths 128 exceeds --block-size 64"):
        main(["bench", "scratch", "--out", str(tmp_path / "y"), "--block-size", "64", "--recall",
              "--recall-lengths", "64", "128"])
    with pytest.raises(SystemExit, match="--recall-pairs 20 does not fit the shortest recall length 64"):
        main(["bench", "scratch", "--out", str(tmp_path / "y"), "--block-size", "64", "--recall",
              "--recall-lengths", "64", "--recall-pairs", "20"])
    assert not (tmp_path / "y").exists()


def test_scratch_comparison_end_to_end(tmp_path, assets, stories260k, monkeypatch):
    monkeypatch.setenv("HF_ARCH_ASSETS", str(assets))
    out = tmp_path / "scratch"
    args = ["bench", "scratch", "--out", str(out), "--variants", "llama", "gated_attention", "move", *TINY, "--json"]
    assert main(args) == 0
    result = json.loads((out / "scratch_comparison.json").read_text())
    assert (out / "scratch_comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "scratch_comparison.md").read_text()
    assert table.startswith("| model | params | Δparams | steps | tokens/s | val loss | val ppl |")
    assert [row["name"] for row in result["models"]] == ["llama", "gated_attention", "move"]
    assert [row["model_type"] for row in result["models"]] == ["llama", "hfa_gated_attention", "hfa_move"]
    assert result["models"][0]["architecture"] == "LlamaForCausalLM"
    baseline = result["baseline_params"]
    for row in result["models"]:
        assert row["baseline_params"] == baseline and abs(row["params"] - baseline) / baseline <= 0.02
        assert row["steps_done"] == 2 and row["cut"] is None and row["tokens_per_second"] > 0
        assert math.isfinite(row["final_val_loss"]) and 0 < row["final_val_loss"] < 10
        assert row["final_val_ppl"] == pytest.approx(math.exp(row["final_val_loss"]), rel=1e-4)
        assert [p["step"] for p in row["curves"]["val"]] == [0, 1, 2]
        assert [p["step"] for p in row["curves"]["train"]] == [1, 2]
    assert {row["train_tokens"] for row in result["models"]} == {2 * 2 * 32}
    assert result["data"]["val_blocks_used"] == 2 and result["data"]["val_stories"] > 0

    with pytest.raises(SystemExit, match="pass --overwrite"):  # a second run refuses to replace the results
        main(args)
    # --resume with the same settings keeps every finished model and trains nothing.
    assert main(args + ["--resume"]) == 0
    assert json.loads((out / "scratch_comparison.json").read_text())["models"] == result["models"]
    with pytest.raises(SystemExit, match="other settings.*seed"):
        main(args + ["--resume", "--seed", "1"])

    # A time budget that the first step already overruns stops the model there, and the table says so.
    args = ["bench", "scratch", "--out", str(out), "--variants", "llama", *TINY, "--steps", "5",
            "--time-budget-min", "1e-9", "--overwrite"]
    assert main(args) == 0
    (row,) = json.loads((out / "scratch_comparison.json").read_text())["models"]
    assert row["steps_done"] == 1 and row["cut"].startswith("time budget") and row["train_tokens"] == 64
    assert "| 1/5 (cut) |" in (out / "scratch_comparison.md").read_text()


def test_hybrid_ratios_with_recall(tmp_path, assets, stories260k, monkeypatch):
    """The hybrid-ratio models train beside the baseline and report the recall probes next to the loss."""
    monkeypatch.setenv("HF_ARCH_ASSETS", str(assets))
    out = tmp_path / "ratios"
    args = ["bench", "scratch", "--out", str(out), "--variants", "llama", "gdn_hybrid_1to1", "gdn_linear", *TINY,
            "--recall", "--recall-lengths", "32", "--recall-samples", "2", "--json"]
    assert main(args) == 0
    result = json.loads((out / "scratch_comparison.json").read_text())
    layer_types = {row["name"]: row["model_type"] for row in result["models"]}
    assert layer_types == {"llama": "llama", "gdn_hybrid_1to1": "hfa_gated_deltanet", "gdn_linear": "hfa_gated_deltanet"}
    for row in result["models"]:
        assert abs(row["params"] - result["baseline_params"]) / result["baseline_params"] <= 0.02
        for probe in ("mqar", "passkey"):
            assert 0.0 <= row["recall"][probe]["32"]["accuracy"] <= 1.0
    assert "| mqar 32 | passkey 32 |" in (out / "scratch_comparison.md").read_text()


def test_recall_blocks_replace_a_seeded_share_of_the_stream(stories260k):
    import torch
    from transformers import AutoTokenizer

    from hf_arch.recipes.recall_probe import word_tokens
    from hf_arch.recipes.scratch_comparison import ScratchComparisonError, mix_recall_blocks

    tokenizer = AutoTokenizer.from_pretrained(stories260k)
    stream = torch.zeros(40, 64, dtype=torch.long)
    mixed, labels = mix_recall_blocks(stream, tokenizer, 0.25, seed=0)
    changed = (mixed != 0).any(-1)
    assert int(changed.sum()) == 10 and torch.equal(stream, torch.zeros(40, 64, dtype=torch.long))  # a copy
    words = set(word_tokens(tokenizer))
    assert all(set(row.tolist()) <= words for row in mixed[changed])
    row = mixed[changed][0].tolist()
    assert row[-2] in row[:32] and row[row.index(row[-2]) + 1] == row[-1]  # a query repeats a key, then its value
    # Stories keep their own labels; an MQAR block is scored on its answers alone: the value after each repeated key.
    assert torch.equal(labels[~changed], mixed[~changed])
    answers = labels[changed][0]
    scored = (answers != -100).nonzero().flatten().tolist()
    assert len(scored) == 16 and all(answers[i] == mixed[changed][0][i] for i in scored)
    assert all(row[i - 1] in row[:32:2] for i in scored)  # each scored token follows a key's repetition
    again, _ = mix_recall_blocks(stream, tokenizer, 0.25, seed=0)
    assert torch.equal(again, mixed)  # the same for every model
    fewer, fewer_labels = mix_recall_blocks(stream, tokenizer, 0.25, seed=0, pairs=4, answers_only=False)
    assert int((fewer_labels[changed][0] != -100).sum()) == 64 and torch.equal(fewer_labels, fewer)
    assert len(set(fewer[changed][0].tolist()[-8::2])) == 4  # four keys queried
    with pytest.raises(ScratchComparisonError, match="--recall-pairs must be in"):
        mix_recall_blocks(stream, tokenizer, 0.25, seed=0, pairs=17)
    with pytest.raises(ScratchComparisonError, match="--recall-train-fraction must be in"):
        mix_recall_blocks(stream, tokenizer, 1.5, seed=0)
    every, _ = mix_recall_blocks(stream, tokenizer, 1.0, seed=0)
    assert bool((every != 0).any(-1).all())  # 1: MQAR alone (Zoology's setting)
