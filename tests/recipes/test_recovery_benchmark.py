"""`hf-arch bench recovery` end to end on stories260K with tiny budgets: in-domain text split, every stage evaluated,
JSON + plot, time budgets through a pilot, resuming after finished methods, and bad input refused before training."""

from __future__ import annotations

import json
import math

import pytest

from hf_arch.cli import main
from hf_arch.recipes.recovery_benchmark import format_table, split_text_file

SEPARATOR = "<|endoftext|>"


@pytest.fixture
def stories_text(tmp_path, assets):
    """The first 120 stories of tinystories_2mib.txt (TinyStories, stories260K's own domain)."""
    text = (assets / "data" / "tinystories_2mib.txt").read_text(encoding="utf-8")
    path = tmp_path / "stories.txt"
    path.write_text(SEPARATOR.join(text.split(SEPARATOR)[:120]), encoding="utf-8")
    return path


def _common(stories260k, out, stories_text):
    return ["bench", "recovery", str(stories260k), "--out", str(out), "--text-file", str(stories_text),
            "--document-separator", SEPARATOR, "--batch-size", "2", "--block-size", "32", "--eval-tokens", "1200",
            "--eval-limit", "0"]


def test_split_holds_out_whole_documents(tmp_path, stories_text):
    train, evaluation = split_text_file(stories_text, tmp_path / "data", SEPARATOR, 0.1)
    train_docs = train.read_text().strip().split("\n\n")
    eval_docs = evaluation.read_text().strip().split("\n\n")
    assert len(eval_docs) == 12 and not set(eval_docs) & set(train_docs)
    assert eval_docs[-1] in stories_text.read_text()


@pytest.mark.slow
def test_recovery_pipeline_in_domain_on_stories260k(tmp_path, stories260k, stories_text, assets, monkeypatch):
    monkeypatch.setenv("HF_ARCH_ASSETS", str(assets))
    out = tmp_path / "recovery"
    args = _common(stories260k, out, stories_text) + ["--methods", "lolcats", "moe_half", "--stage1-steps", "1",
                                                      "--stage2-steps", "1", "--json"]
    assert main(args) == 0
    result = json.loads((out / "recovery.json").read_text())
    assert (out / "recovery.png").stat().st_size > 0
    assert result["source_eval"]["file"].endswith("eval.txt") and "tasks" not in result["source_eval"]
    assert [row["method"] for row in result["methods"]] == ["lolcats", "moe_half"]
    for row in result["methods"]:
        assert [p["stage"] for p in row["points"]] == ["converted", "stage1", "stage2"]
        assert all(math.isfinite(p["ppl"]) for p in row["points"])
    lolcats, moe = result["methods"]
    assert [p["tokens"] for p in lolcats["points"]] == [0, 64, 128]
    # The partition's routers were fitted at conversion, so its router-only stage is skipped.
    assert [p["tokens"] for p in moe["points"]] == [0, 0, 64]
    assert moe["points"][1]["skipped"] == "routers fitted at conversion (router distillation)"
    assert len(lolcats["attention_mse_before"]) == 5 and len(lolcats["attention_mse_after_stage1"]) == 5
    # The partition fitted its routers on the training text at conversion, and says so.
    assert moe["conversion_report"]["resolved_options"]["shared_neurons"] == 20
    assert len(moe["conversion_report"]["router_distillation"]) == 5
    assert format_table(result).count("| lolcats |") == 3

    # A rerun resumes: the finished methods stay, only the new one runs.
    assert main(_common(stories260k, out, stories_text) + ["--methods", "lolcats", "moe_upcycle", "--stage1-steps",
                                                           "1", "--stage2-steps", "1"]) == 0
    again = json.loads((out / "recovery.json").read_text())
    assert [row["method"] for row in again["methods"]] == ["lolcats", "moe_half", "moe_upcycle"]
    assert again["methods"][0] == result["methods"][0]
    # Upcycling is exact: the converted model scores like the source.
    assert again["methods"][2]["points"][0]["ppl"] == pytest.approx(result["source_eval"]["ppl"], rel=1e-4)
    # Other settings are refused by name rather than mixed into the same table.
    with pytest.raises(SystemExit, match="block_size: 32 there, 64 now"):
        main(_common(stories260k, out, stories_text)[:-6] + ["--block-size", "64", "--eval-tokens", "1200",
                                                             "--eval-limit", "0", "--methods", "lolcats"])


@pytest.mark.slow
def test_minutes_budget_runs_the_steps_a_pilot_says_fit(tmp_path, stories260k, stories_text, assets, monkeypatch):
    monkeypatch.setenv("HF_ARCH_ASSETS", str(assets))
    out = tmp_path / "timed"
    assert main(_common(stories260k, out, stories_text) + ["--methods", "liger", "--minutes", "0.05"]) == 0
    row = json.loads((out / "recovery.json").read_text())["methods"][0]
    stage2 = row["points"][-1]
    assert row["points"][1]["skipped"] == "no new parameters"  # Liger adds none: no attention transfer
    assert stage2["steps"] >= 1 and stage2["train_seconds"] <= 0.05 * 60 * 1.5 + 5
    assert stage2["tokens"] == stage2["steps"] * 2 * 32 and stage2["tokens_per_second"] > 0
    # A budget that fits no step is refused by the pilot, before the stage trains.
    with pytest.raises(SystemExit, match=r"--minutes 1e-05: one stage2 step takes .* s; the budget fits none"):
        main(_common(stories260k, tmp_path / "tiny", stories_text) + ["--methods", "liger", "--minutes", "0.00001"])


def test_bad_input_is_refused_before_training(tmp_path, stories260k, stories_text, assets, monkeypatch):
    monkeypatch.setenv("HF_ARCH_ASSETS", str(assets))
    short = tmp_path / "short.txt"
    short.write_text("Once upon a time.\n")
    with pytest.raises(SystemExit, match=r"short.txt: \d+ tokens .* one scoring window of the source needs 513"):
        main(["bench", "recovery", str(stories260k), "--out", str(tmp_path / "a"), "--train-file", str(stories_text),
              "--eval-file", str(short), "--methods", "liger"])
    with pytest.raises(SystemExit, match="--train-file .*missing.txt does not exist"):
        main(["bench", "recovery", str(stories260k), "--out", str(tmp_path / "b"), "--train-file",
              str(tmp_path / "missing.txt"), "--methods", "liger"])
    with pytest.raises(SystemExit, match="--minutes must be > 0"):
        main(_common(stories260k, tmp_path / "c", stories_text) + ["--minutes", "0"])
    assert not (tmp_path / "a" / "liger").exists() and not (tmp_path / "b").exists()
