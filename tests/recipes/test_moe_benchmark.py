"""The MoE benchmark on tiny sizes: every impl yields finite positive timings (or says why it was skipped), tables
format, and the CLI prints JSON."""

import json
import math

import torch

from hf_arch.cli import main
from hf_arch.recipes.moe_benchmark import (
    benchmark_moe_layers,
    benchmark_moe_training,
    format_moe_layer_table,
    format_moe_training_table,
    our_backends,
)

LAYERS = {("hf_arch", "torch"), ("transformers_eager", "eager"), ("transformers_grouped_mm", "grouped_mm"),
          ("dense_ffn", "torch")}
TINY_TRAIN = dict(hidden=32, layers=2, heads=4, experts=4, top_k=2, vocab_size=64, seq_len=16, batch_size=2,
                  steps=2, warmup=1, progress=False)


def _positive_finite(x):
    return isinstance(x, float) and math.isfinite(x) and x > 0


def _check_timed_or_skipped(row, keys):
    if "skipped" in row:
        assert isinstance(row["skipped"], str) and row["skipped"], row
        assert not keys & row.keys(), row
    else:
        assert all(_positive_finite(row[k]) for k in keys), row


def test_cpu_has_no_triton_backend():
    assert our_backends("cpu") == ["torch"]


def test_layer_rows_cover_every_impl_with_positive_timings():
    rows = benchmark_moe_layers(experts=(4, 8), tokens=64, hidden=32, repeats=1, device="cpu", progress=False)
    assert {(r["layer"], r["backend"]) for r in rows} == LAYERS  # no triton row on CPU
    assert [r["experts"] for r in rows] == [4] * len(LAYERS) + [8] * len(LAYERS)
    keys = {"fwd_ms", "fwdbwd_ms", "fwdbwd_tokens_per_s"}
    for row in rows:
        assert row["top_k"] == 2 and row["tokens"] == 64 and row["expert_intermediate"] == 64
        _check_timed_or_skipped(row, keys)
        if row["layer"] != "transformers_grouped_mm":  # the only one allowed to be skipped
            assert "skipped" not in row, row

    table = format_moe_layer_table(rows)
    ours = [line for line in table.splitlines() if line.startswith("| hf_arch | torch | 4 |")]
    assert len(ours) == 1
    cells = [cell.strip() for cell in ours[0].strip("|").split("|")]
    assert len(cells) == 14
    eager_and_dense = cells[8:10] + cells[12:14]
    assert all(float(s) > 0 for s in eager_and_dense)


def test_layer_table_shows_skipped_rows():
    row = {"layer": "transformers_grouped_mm", "backend": "grouped_mm", "experts": 4, "top_k": 2, "tokens": 8,
           "skipped": "NotImplementedError: nope"}
    table = format_moe_layer_table([row])
    assert "skipped: NotImplementedError: nope" in table
    assert all(line.count("|") == table.splitlines()[0].count("|") for line in table.splitlines())


def test_training_rows_counts_and_ratio():
    rows = benchmark_moe_training(**TINY_TRAIN)
    assert [r["model"] for r in rows] == ["hf_arch_moe", "llama_dense", "qwen3_moe_eager", "qwen3_moe_grouped_mm"]
    by_name = {r["model"]: r for r in rows}
    for name in ("hf_arch_moe", "llama_dense", "qwen3_moe_eager"):
        assert "skipped" not in by_name[name], by_name[name]
    for row in rows:
        _check_timed_or_skipped(row, {"tokens_per_s", "step_ms", "ratio_vs_dense"})
    dense, moe = by_name["llama_dense"], by_name["hf_arch_moe"]
    assert dense["ratio_vs_dense"] == 1.0
    assert dense["params_total"] == dense["params_active"]
    assert moe["params_total"] > moe["params_active"]
    # Experts hold 3·H·I weights each; top-2 of 4 means half of them are inactive per token, in every layer.
    assert moe["params_total"] - moe["params_active"] == 2 * 2 * 3 * 32 * 64
    # Same active FFN weights as the dense model; the MoE adds only its routers (E·H per layer).
    assert moe["params_active"] - dense["params_active"] == 2 * 4 * 32
    table = format_moe_training_table(rows)
    assert table.count("\n") == len(rows) + 1 and "| llama_dense |" in table and "| 1.00 |" in table


def test_cli_bench_moe_prints_json(capsys):
    assert main(["bench", "moe", "--json", "--experts", "4", "--tokens", "32", "--hidden", "32", "--repeats", "1",
                 "--device", "cpu", "--train-layers", "1", "--train-experts", "4", "--train-seq-len", "8",
                 "--train-batch-size", "1", "--train-steps", "1", "--train-vocab-size", "64"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["device"] == "cpu" and data["torch"] == torch.__version__ and data["threads"] >= 1
    assert {(r["layer"], r["backend"]) for r in data["layers"]} == LAYERS
    assert all(r["experts"] == 4 and r["tokens"] == 32 for r in data["layers"])
    assert {r["model"] for r in data["training"]} >= {"hf_arch_moe", "llama_dense", "qwen3_moe_eager"}
    assert all(_positive_finite(r["tokens_per_s"]) for r in data["training"] if "skipped" not in r)


def test_cli_bench_moe_text_tables_skip_model(capsys):
    assert main(["bench", "moe", "--experts", "4", "--tokens", "16", "--hidden", "16", "--repeats", "1",
                 "--device", "cpu", "--skip-model"]) == 0
    out = capsys.readouterr().out
    assert "| hf_arch | torch | 4 | 2 | 16 |" in out and "| dense_ffn | torch | 4 |" in out
    assert "tokens/s | × vs llama_dense" not in out  # training skipped
