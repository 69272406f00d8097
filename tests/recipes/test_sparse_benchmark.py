"""`hf-arch bench sparse` end to end on stories260K with tiny budgets: gates trained, sweeps scored, Flux routed,
attention op timed; JSON + plot written; nonsense contexts refused."""

from __future__ import annotations

import json
import math

import pytest

from hf_arch.cli import main
from hf_arch.recipes.sparse_benchmark import branch_density, format_table


def test_branch_density_counts_sink_and_window_blocks():
    # 4 blocks, 1 sink, 1-block window: rows keep {0}, {0,1}, {0,2}, {0,3} = 7 of 10 causal blocks.
    assert branch_density(64, 16, 1, 1) == pytest.approx(7 / 10)
    assert branch_density(64, 16, 0, 4) == 1.0


@pytest.mark.slow
def test_sparse_pipeline_on_stories260k(tmp_path, stories260k, assets, monkeypatch):
    monkeypatch.setenv("HF_ARCH_ASSETS", str(assets))
    out = tmp_path / "sparse"
    # In domain: stories260K on a held-out tail of TinyStories (its training text).
    stories = (assets / "data" / "tinystories_2mib.txt").read_text(encoding="utf-8").split("<|endoftext|>")[:80]
    (tmp_path / "stories.txt").write_text("<|endoftext|>".join(stories), encoding="utf-8")
    args = ["bench", "sparse", str(stories260k), "--out", str(out), "--context", "128", "--block-size", "16",
            "--gate-steps", "2", "--flux-steps", "2", "--eval-windows", "1", "--thresholds", "0.05", "--topk", "2",
            "--flux-targets", "0.5", "--repeats", "1", "--delta-budgets", "8", "128", "--delta-dense-layers", "1",
            "--delta-window-tokens", "8", "--text-file", str(tmp_path / "stories.txt"),
            "--document-separator", "<|endoftext|>", "--json"]
    assert main(args) == 0
    result = json.loads((out / "sparse.json").read_text())
    assert result["eval_file"] == str(out / "data" / "eval.txt")
    assert (out / "sparse.png").stat().st_size > 0
    assert [p["selection"] for p in result["seer"]["points"]] == ["threshold", "topk"]
    for point in result["seer"]["points"]:
        assert math.isfinite(point["ppl"]) and 0 < point["density"] <= 1
    topk = result["seer"]["points"][1]
    assert topk["density"] < 1  # top-2 of 8 key blocks cannot be dense
    assert result["flux"]["targets"][0]["target_sparsity"] == 0.5
    # Each trained component records what it trained: steps, tokens, wall and CPU seconds of training alone.
    for record in (result["seer"], result["flux"]["targets"][0]):
        assert record["steps"] == 2 and record["tokens"] == 2 * 128 and record["train_cpu_seconds"] >= 0
    assert result["flux"]["all_sparse"]["sparse_share"] == 1.0
    assert math.isfinite(result["dense"]["ppl"]) and result["attention_time"]["block_sparse"]
    assert "| seer | top-2 blocks |" in format_table(result)
    # DELTA, no training: a budget that covers the context is the source exactly; 8 keys per query attend less.
    small, whole = result["delta"]["points"]
    assert whole["token_budget"] == 128 and whole["attended_share"] == 1.0 and whole["ppl"] == result["dense"]["ppl"]
    assert small["attended_share"] < 1.0 and small["attended_share_all_layers"] > small["attended_share"]
    assert small["selection_layers"] == [1, 3] and "| delta | 8 keys/query" in format_table(result)
    # A rerun continues the results: the trained gates and routers are reused, only new settings are scored.
    assert main(args[:-1] + ["--thresholds", "0.05", "0.2"]) == 0
    resumed = json.loads((out / "sparse.json").read_text())
    assert resumed["seer"]["points"][:2] == result["seer"]["points"]
    assert [p.get("threshold") for p in resumed["seer"]["points"]] == [0.05, None, 0.2]
    assert resumed["flux"] == result["flux"] and resumed["dense"] == result["dense"]
    with pytest.raises(SystemExit, match=r"\(gate_steps: 2 there, 3 now\); pass --overwrite"):
        main(args[:-1] + ["--gate-steps", "3"])
    result = resumed
    before = result["attention_time"]
    assert main(args + ["--retime"]) == 0  # timing alone, on the results already there
    after = json.loads((out / "sparse.json").read_text())
    assert after["seer"] == result["seer"] and [r["density"] for r in after["attention_time"]["block_sparse"]] == [
        r["density"] for r in before["block_sparse"]]
    # A CPU-time budget instead of step counts: a pilot sizes the run, the record says which clock budgeted it.
    timed = tmp_path / "timed"
    assert main(args[:4] + [str(timed)] + args[5:-1] + ["--minutes", "0.05", "--flux-targets"]) == 0
    seer = json.loads((timed / "sparse.json").read_text())["seer"]
    assert seer["budget_clock"] == "cpu" and seer["budget_minutes"] == 0.05 and seer["steps"] >= 1
    assert seer["train_cpu_seconds"] <= 0.05 * 60 * 1.5 + 5
    with pytest.raises(SystemExit, match="--minutes must be > 0"):
        main(args[:4] + [str(tmp_path / "y")] + args[5:] + ["--minutes", "0"])
    with pytest.raises(SystemExit, match="fewer than two blocks"):
        main(["bench", "sparse", str(stories260k), "--out", str(tmp_path / "x"), "--context", "16",
              "--block-size", "16"])
