"""The end-to-end benchmark on a tiny random Llama: every row measured, caches sized, the CLI's files written."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from hf_arch.recipes.e2e_benchmark import _cache_bytes, benchmark_e2e, format_e2e_table, main


@pytest.fixture(scope="module")
def tiny_source(tmp_path_factory):
    path = tmp_path_factory.mktemp("e2e") / "llama"
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return path


def test_rows_for_every_model_and_context(tiny_source):
    models = ("source", "mamba_init", "liger", "moe_half", "seer_half")
    rows = benchmark_e2e(tiny_source, models, contexts=(24, 16), decode_tokens=2, repeats=1, isolate=False,
                         progress=False)
    assert [(r["model"], r["context"]) for r in rows] == [(m, c) for m in models for c in (16, 24)]
    for row in rows:
        assert row["prefill_tokens_per_s"] > 0 and row["decode_ms_per_token"] > 0 and row["peak_memory_mb"] > 0
        assert row["cache_mb"] > 0
    by = {(r["model"], r["context"]): r["cache_mb"] for r in rows}
    # A KV cache grows with the context; Gated DeltaNet's fixed-size state does not.
    assert by[("source", 24)] > by[("source", 16)]
    assert by[("mamba_init", 24)] == pytest.approx(by[("mamba_init", 16)])
    table = format_e2e_table(rows)
    assert table.count("| source |") == 2 and "| 1.00 |" in table


def test_cache_bytes_counts_each_tensor_once():
    t = torch.zeros(10, dtype=torch.float32)
    assert _cache_bytes({"a": t, "b": [t, torch.zeros(2, dtype=torch.float64)]}) == 40 + 16


def test_bad_input_is_refused(tiny_source):
    with pytest.raises(ValueError, match="not in the e2e benchmark"):
        benchmark_e2e(tiny_source, ("nope",), isolate=False, progress=False)
    with pytest.raises(ValueError, match="contexts must be positive"):
        benchmark_e2e(tiny_source, ("source",), contexts=(0,), isolate=False, progress=False)


def test_cli_writes_json_table_and_plot(tiny_source, tmp_path, capsys):
    out = tmp_path / "e2e"
    assert main([str(tiny_source), "--models", "source", "--contexts", "8", "--decode-tokens", "1", "--repeats", "1",
                 "--device", "cpu", "--out", str(out)]) == 0
    data = json.loads((out / "e2e.json").read_text())
    assert data["device"] == "cpu" and [r["model"] for r in data["rows"]] == ["source"]
    assert (out / "e2e.md").read_text().startswith("| model |") and (out / "e2e.png").stat().st_size > 0
    assert "| source | 8 |" in capsys.readouterr().out
