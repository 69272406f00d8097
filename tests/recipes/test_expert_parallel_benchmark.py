"""`hf-arch bench expert-parallel` on a tiny MoE: one process vs two with the experts sharded, the same tokens; each
rank of two holds half the expert parameters; bad settings are refused by name."""

from __future__ import annotations

import pytest

from hf_arch.recipes.expert_parallel_benchmark import benchmark_expert_parallel, format_expert_parallel_table


@pytest.mark.slow
def test_two_processes_hold_half_the_experts_each():
    rows = benchmark_expert_parallel(experts=(4,), world_sizes=(1, 2), hidden=64, layers=2, tokens=256, seq_len=64,
                                     repeats=1, progress=False)
    one, two = rows
    assert (one["world_size"], two["world_size"]) == (1, 2) and one["tokens"] == two["tokens"] == 256
    assert two["expert_params_per_rank"] * 2 == one["expert_params_per_rank"]
    assert len(two["peak_mb_per_rank"]) == 2 and all(r["tokens_per_s"] > 0 for r in rows)
    assert "| 4 | 2 | " in format_expert_parallel_table(rows)


def test_bad_settings_are_refused_by_name():
    with pytest.raises(ValueError, match="3 experts do not divide over 2 processes"):
        benchmark_expert_parallel(experts=(3,), world_sizes=(2,), progress=False)
    with pytest.raises(ValueError, match="fewer than one 256-token row per process"):
        benchmark_expert_parallel(experts=(4,), world_sizes=(2,), tokens=256, progress=False)
