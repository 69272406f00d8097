"""`hf-arch bench sequence-parallel`: one and two processes on a tiny model give rows with timings and per-rank
memory; bad arguments are refused by name."""

from __future__ import annotations

import json

import pytest

from hf_arch.cli import main
from hf_arch.recipes.sequence_parallel_benchmark import benchmark_sequence_parallel, format_sequence_parallel_table


@pytest.mark.slow
def test_rows_for_one_and_two_processes(capsys):
    assert main(["bench", "sequence-parallel", "--seq-lens", "128", "--world-sizes", "1", "2", "--hidden", "64",
                 "--layers", "2", "--repeats", "1", "--cores", "2", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    rows = result["rows"]
    assert [(r["T"], r["world_size"], r["threads_per_rank"]) for r in rows] == [(128, 1, 2), (128, 2, 1)]
    assert all(r["step_ms"] > 0 and r["tokens_per_s"] > 0 for r in rows)
    assert [len(r["peak_mb_per_rank"]) for r in rows] == [1, 2]
    assert "| hybrid | 128 | 2 | 1 |" in format_sequence_parallel_table(rows)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="--model must be one of"):
        benchmark_sequence_parallel(model="llama", progress=False)
    with pytest.raises(ValueError, match="T=2 cannot be split across 4 processes"):
        benchmark_sequence_parallel(seq_lens=(2,), world_sizes=(4,), progress=False)
