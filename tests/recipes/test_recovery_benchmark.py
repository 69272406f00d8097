"""`hf-arch bench recovery` end to end on stories260K with one-step budgets: every stage evaluated, JSON + plot."""

from __future__ import annotations

import json
import math

import pytest

from hf_arch.cli import main
from hf_arch.recipes.recovery_benchmark import format_table


@pytest.mark.slow
def test_recovery_pipeline_on_stories260k(tmp_path, stories260k, assets, monkeypatch):
    monkeypatch.setenv("HF_ARCH_ASSETS", str(assets))
    out = tmp_path / "recovery"
    args = ["bench", "recovery", str(stories260k), "--out", str(out), "--methods", "lolcats", "moe_upcycle",
            "--stage1-steps", "1", "--stage2-steps", "1", "--batch-size", "2", "--block-size", "32",
            "--ppl-tokens", "256", "--eval-limit", "4", "--json"]
    assert main(args) == 0
    result = json.loads((out / "recovery.json").read_text())
    assert (out / "recovery.png").stat().st_size > 0
    assert [row["method"] for row in result["methods"]] == ["lolcats", "moe_upcycle"]
    for row in result["methods"]:
        assert [p["stage"] for p in row["points"]] == ["converted", "stage1", "stage2"]
        assert [p["tokens"] for p in row["points"]] == [0, 64, 128]
        for point in row["points"]:
            assert math.isfinite(point["ppl"]) and set(point["tasks"]) == {
                "piqa_valid", "arc_easy_test", "winogrande_dev"}
    lolcats, upcycle = result["methods"]
    assert len(lolcats["attention_mse_before"]) == 5 and len(lolcats["attention_mse_after_stage1"]) == 5
    # Upcycling is exact: the converted model scores like the source.
    assert upcycle["points"][0]["ppl"] == pytest.approx(result["source_eval"]["ppl"], rel=1e-4)
    table = format_table(result)
    assert table.count("| lolcats |") == 3 and "| source |" in table

    with pytest.raises(SystemExit, match="pass --overwrite"):  # a second run refuses to overwrite the results
        main(args)
