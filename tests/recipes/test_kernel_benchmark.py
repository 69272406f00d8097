"""The kernel / decode benchmark on tiny sizes: every impl yields finite positive timings, tables and CLI JSON."""

import json
import math

import pytest

from hf_arch.cli import main
from hf_arch.recipes.kernel_benchmark import (
    benchmark_decode,
    benchmark_kernels,
    format_decode_table,
    format_kernel_table,
    registered_kernel_impls,
)

CPU_IMPLS = {
    ("gated_delta_rule", "hf_arch.torch"),
    ("gated_delta_rule", "transformers"),
    ("gla", "hf_arch.torch"),
    ("sliding_window_attention", "hf_arch.torch w=64"),
    ("liger_hybrid", "hf_arch w=64"),
    ("causal_attention", "sdpa"),
}


def _positive_finite(x):
    return isinstance(x, float) and math.isfinite(x) and x > 0


def test_kernel_rows_cover_every_cpu_impl_with_positive_timings():
    rows = benchmark_kernels(seq_lens=[32, 48], heads=2, head_dim=16, repeats=1, progress=False)
    # Plus the rows kernel packages declare themselves (kernels/<op>/benchmark.py).
    impls = CPU_IMPLS | {(op, impl) for op, impl, *_ in registered_kernel_impls("cpu")}
    assert {(r["op"], r["impl"]) for r in rows} == impls
    assert sorted({r["T"] for r in rows}) == [32, 48] and len(rows) == 2 * len(impls)
    for row in rows:
        assert "skipped" not in row, row
        assert {"op", "impl", "T", "fwd_ms", "fwdbwd_ms"} <= row.keys()
        assert _positive_finite(row["fwd_ms"]) and _positive_finite(row["fwdbwd_ms"])

    table = format_kernel_table(rows)
    ours = [line for line in table.splitlines() if line.startswith("| gated_delta_rule | hf_arch.torch | 32 |")]
    assert len(ours) == 1
    speedups = [cell.strip() for cell in ours[0].strip("|").split("|")][5:]
    assert len(speedups) == 4 and all(float(s) > 0 for s in speedups)


def test_ops_filter_and_unknown_ops():
    rows = benchmark_kernels(seq_lens=[16], heads=1, head_dim=8, repeats=1, progress=False, ops=("gla",))
    assert {r["op"] for r in rows} == {"gla"}
    with pytest.raises(ValueError, match=r"ops \['no_such_op'\] have no kernel benchmark; known: \["):
        benchmark_kernels(seq_lens=[16], progress=False, ops=("no_such_op",))


def test_windows_give_one_row_each():
    rows = benchmark_kernels(seq_lens=[40], heads=1, head_dim=8, repeats=1, progress=False,
                             ops=("sliding_window_attention", "liger_hybrid"), windows=(4, 16))
    assert sorted((r["op"], r["impl"]) for r in rows) == [
        ("liger_hybrid", "hf_arch w=16"), ("liger_hybrid", "hf_arch w=4"),
        ("sliding_window_attention", "hf_arch.torch w=16"), ("sliding_window_attention", "hf_arch.torch w=4")]
    assert all(_positive_finite(r["fwd_ms"]) for r in rows)


def test_slow_impls_are_skipped_at_longer_lengths():
    rows = benchmark_kernels(seq_lens=[16, 32], heads=1, head_dim=8, repeats=1, per_call_limit_s=0.0, progress=False)
    for row in rows:
        if row["T"] == 16:
            assert "fwd_ms" in row
        else:
            assert "skipped" in row and "T=16" in row["skipped"] and "fwd_ms" not in row
    assert "skipped" in format_kernel_table(rows)


def test_decode_rows_and_table():
    rows = benchmark_decode(contexts=[16, 24], hidden_size=32, layers=2, heads=4, new_tokens=2, repeats=1,
                            vocab_size=64, progress=False)
    assert [(r["model"], r["context"]) for r in rows] == [
        ("gated_deltanet", 16), ("llama_sdpa", 16), ("gated_deltanet", 24), ("llama_sdpa", 24)]
    assert all(_positive_finite(r["ms_per_token"]) for r in rows)
    table = format_decode_table(rows)
    assert table.count("| llama_sdpa |") == 2 and "| 1.00 |" in table


def test_cli_bench_kernels_prints_json(capsys):
    assert main(["bench", "kernels", "--json", "--seq-lens", "32", "--repeats", "1", "--device", "cpu",
                 "--decode-contexts", "16", "--decode-hidden-size", "32", "--decode-layers", "2",
                 "--decode-tokens", "2"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["device"] == "cpu" and data["torch"]
    assert {(r["op"], r["impl"]) for r in data["kernels"]} == CPU_IMPLS | {
        (op, impl) for op, impl, *_ in registered_kernel_impls("cpu")}
    assert all(r["T"] == 32 and _positive_finite(r["fwd_ms"]) for r in data["kernels"])
    assert {r["model"] for r in data["decode"]} == {"gated_deltanet", "llama_sdpa"}
    assert all(r["context"] == 16 and _positive_finite(r["ms_per_token"]) for r in data["decode"])


def test_cli_bench_kernels_text_tables(capsys):
    assert main(["bench", "kernels", "--seq-lens", "32", "--repeats", "1", "--device", "cpu", "--skip-decode"]) == 0
    out = capsys.readouterr().out
    assert "| gated_delta_rule | transformers | 32 |" in out and "| causal_attention | sdpa | 32 |" in out
    assert "ms/token" not in out  # decode skipped
