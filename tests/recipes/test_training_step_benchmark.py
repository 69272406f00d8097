"""The torch.compile training-step benchmark: rows per method and mode, the break-even stage length, bad input."""

from __future__ import annotations

import json

import pytest

from hf_arch.recipes.training_step_benchmark import main


def test_eager_rows_for_the_source_and_a_linearization(stories260k, capsys):
    assert main([str(stories260k), "--methods", "source", "mamba_init", "--batch-size", "2", "--block-size", "16",
                 "--steps", "1", "--modes", "eager", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert [row["method"] for row in result["rows"]] == ["source", "mamba_init"]
    for row in result["rows"]:
        assert row["eager"]["tokens_per_s"] > 0 and row["eager"]["first_step_s"] > 0 and "compiled" not in row
    assert result["threads"] >= 1 and result["block_size"] == 16


def test_bad_sizes_are_refused(stories260k):
    with pytest.raises(SystemExit, match="--steps must be >= 1, got 0"):
        main([str(stories260k), "--steps", "0"])
