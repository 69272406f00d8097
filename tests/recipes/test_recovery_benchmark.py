"""`hf-arch bench recovery` end to end on stories260K with tiny budgets: in-domain text split, every stage evaluated,
JSON + plot, time budgets through a pilot, resuming after finished methods, and bad input refused before training."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from hf_arch.cli import main
from hf_arch.recipes.recovery_benchmark import (format_table, resolve_method, split_text_file, stage_recipes,
                                                 _merge_and_save)

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
            "--document-separator", SEPARATOR, "--generation-prompts", "0", "--generation-prompt-tokens", "32",
            "--batch-size", "2", "--block-size", "32", "--eval-tokens", "1200",
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
                                                      "--stage2-steps", "1", "--json", "--generation-prompts", "8"]
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
    # Each trained point carries its stage's logged loss curve, in tokens since the start of training.
    assert [tokens for tokens, _ in lolcats["points"][2]["loss_curve"]] == [128]
    assert all(math.isfinite(loss) for _, loss in lolcats["points"][2]["loss_curve"])
    # The partition's routers were fitted at conversion, so its router-only stage is skipped.
    assert [p["tokens"] for p in moe["points"]] == [0, 0, 64]
    assert moe["points"][1]["skipped"] == "routers fitted at conversion (router / pre-gate distillation)"
    assert len(lolcats["attention_mse_before"]) == 5 and len(lolcats["attention_mse_after_stage1"]) == 5
    # The partition fitted its routers on the training text at conversion, and says so.
    assert moe["conversion_report"]["resolved_options"]["shared_neurons"] == 20
    assert len(moe["conversion_report"]["router_distillation"]) == 5
    assert format_table(result).count("| lolcats |") == 3
    # Every point continues the same 8 held-out prompts greedily and compares with the source's continuations.
    reference = json.loads((out / "generation_reference.json").read_text())
    assert len(reference["prompts"]) == 8 and all(len(c) == 32 for c in reference["continuations"])
    for point in lolcats["points"] + moe["points"]:
        assert point["generation"]["prompts"] == 8 and 0 <= point["generation"]["token_agreement"] <= 1
    assert "greedy agreement" in format_table(result)

    # A rerun resumes: the finished methods stay, only the new one runs.
    assert main(_common(stories260k, out, stories_text) + ["--methods", "lolcats", "moe_upcycle", "source_ft",
                                                           "--stage1-steps", "1", "--stage2-steps", "1",
                                                           "--generation-prompts", "8"]) == 0
    again = json.loads((out / "recovery.json").read_text())
    assert [row["method"] for row in again["methods"]] == ["lolcats", "moe_half", "moe_upcycle", "source_ft"]
    assert again["methods"][0] == result["methods"][0]
    # The fine-tuned source, the bar for every row: unconverted, then the linearizations' stage-2 recipe.
    source_ft = again["methods"][3]
    assert source_ft["max_abs_logit_diff"] == 0.0 and source_ft["recipe"]["stage2_mode"] == "full"
    assert source_ft["points"][0]["ppl"] == pytest.approx(result["source_eval"]["ppl"], rel=1e-5)
    assert source_ft["points"][1]["skipped"] == "the recipe has no attention-transfer stage"
    assert source_ft["points"][2]["tokens"] == 64 and source_ft["points"][2]["ppl"] != source_ft["points"][0]["ppl"]
    # Upcycling is exact: the converted model scores like the source.
    assert again["methods"][2]["points"][0]["ppl"] == pytest.approx(result["source_eval"]["ppl"], rel=1e-4)
    # ... and generates as the source does (a check that can fail: the untrained MoE partition does not). So does the
    # converted LoLCATs model: prompt + continuation (64 tokens) fit its 128-token window, where it is exact.
    assert again["methods"][2]["points"][0]["generation"]["token_agreement"] >= 0.99
    assert lolcats["points"][0]["generation"]["token_agreement"] >= 0.99
    assert moe["points"][0]["generation"]["token_agreement"] < 0.9
    # The generation check can be scored again from the saved checkpoints with other settings (nothing trains).
    assert main(_common(stories260k, out, stories_text) + ["--stage1-steps", "1", "--stage2-steps", "1",
                                                           "--recheck-generation", "--generation-prompts", "4",
                                                           "--generation-prompt-tokens", "40"]) == 0
    rechecked = json.loads((out / "recovery.json").read_text())
    assert rechecked["settings"]["generation_prompts"] == 4 and rechecked["settings"]["generation_prompt_tokens"] == 40
    for row, before in zip(rechecked["methods"], again["methods"]):
        assert [p["ppl"] for p in row["points"]] == [p["ppl"] for p in before["points"]]
        assert all(p["generation"]["prompts"] == 4 for p in row["points"])
    assert rechecked["methods"][1]["points"][1]["generation"] == rechecked["methods"][1]["points"][0]["generation"]
    # Other settings are refused by name rather than mixed into the same table.
    with pytest.raises(SystemExit, match="block_size: 32 there, 64 now"):
        main(_common(stories260k, out, stories_text)[:-6] + ["--block-size", "64", "--eval-tokens", "1200",
                                                             "--eval-limit", "0", "--methods", "lolcats"])


class MachineShutDown(Exception):
    pass


@pytest.mark.slow
def test_interrupted_method_resumes_after_its_last_finished_stage(tmp_path, stories260k, stories_text, assets,
                                                                  monkeypatch):
    from hf_arch.recipes import recovery_benchmark as bench

    monkeypatch.setenv("HF_ARCH_ASSETS", str(assets))
    out = tmp_path / "resumed"
    args = _common(stories260k, out, stories_text) + ["--methods", "lolcats", "--stage1-steps", "1",
                                                      "--stage2-steps", "1"]
    real_run_stage, calls, interrupted_once = bench._run_stage, [], []

    def interrupted(recipe, work, stage, args, extra_minutes=0.0):
        calls.append(stage)
        if stage == "stage2" and not interrupted_once:
            interrupted_once.append(stage)
            (work / stage).mkdir(parents=True)  # a stage that dies leaves partial output behind
            raise MachineShutDown
        return real_run_stage(recipe, work, stage, args, extra_minutes)

    monkeypatch.setattr(bench, "_run_stage", interrupted)
    with pytest.raises(MachineShutDown):
        main(args)
    progress = json.loads((out / "lolcats" / "progress.json").read_text())
    assert progress["stages_done"] == 1 and [p["stage"] for p in progress["row"]["points"]] == ["converted", "stage1"]
    assert main(args) == 0  # converts nothing and trains stage 1 no more: only stage 2 runs
    assert calls == ["stage1", "stage2", "stage2"]
    row = json.loads((out / "recovery.json").read_text())["methods"][0]
    assert [p["stage"] for p in row["points"]] == ["converted", "stage1", "stage2"]
    assert [p["tokens"] for p in row["points"]] == [0, 64, 128] and row["resumed_after_stages"] == 1
    assert row["points"][1] == progress["row"]["points"][1]
    assert not (out / "lolcats" / "progress.json").exists()  # the finished row lives in recovery.json alone
    # Other settings do not resume a partial run: it starts afresh.
    (out / "lolcats" / "progress.json").write_text(json.dumps({**progress, "settings": {"block_size": 64}}))
    calls.clear()
    assert main(args[:-4] + ["--methods", "source_ft", "--stage1-steps", "1", "--stage2-steps", "1"]) == 0
    assert calls == ["stage2"]  # source_ft: stage 1 skipped, nothing resumed from lolcats' folder


@pytest.mark.slow
def test_interruption_during_evaluation_costs_no_retraining(tmp_path, stories260k, stories_text, assets, monkeypatch):
    from hf_arch.recipes import recovery_benchmark as bench

    monkeypatch.setenv("HF_ARCH_ASSETS", str(assets))
    out = tmp_path / "eval_interrupted"
    args = _common(stories260k, out, stories_text) + ["--methods", "lolcats", "--stage1-steps", "1",
                                                      "--stage2-steps", "1"]
    real_run_stage, real_evaluate, calls, evaluated = bench._run_stage, bench.evaluate_model, [], []

    def counted(recipe, work, stage, args, extra_minutes=0.0):
        calls.append(stage)
        return real_run_stage(recipe, work, stage, args, extra_minutes)

    def dies_on_stage2(path, *a, **k):
        evaluated.append(Path(path).parent.name)
        if Path(path).parent.name == "stage2" and evaluated.count("stage2") == 1:
            raise MachineShutDown
        return real_evaluate(path, *a, **k)

    monkeypatch.setattr(bench, "_run_stage", counted)
    monkeypatch.setattr(bench, "evaluate_model", dies_on_stage2)
    with pytest.raises(MachineShutDown):
        main(args)
    assert calls == ["stage1", "stage2"]
    assert main(args) == 0
    assert calls == ["stage1", "stage2"]  # stage 2's finished training was evaluated, not rerun
    row = json.loads((out / "recovery.json").read_text())["methods"][0]
    assert [p["stage"] for p in row["points"]] == ["converted", "stage1", "stage2"]
    assert [p["tokens"] for p in row["points"]] == [0, 64, 128] and row["points"][2]["steps"] == 1
    # A stage folder trained from another starting point is not taken for this one.
    assert bench._finished_training(out / "lolcats" / "stage2", out / "elsewhere") is None


@pytest.mark.slow
def test_minutes_budget_runs_the_steps_a_pilot_says_fit(tmp_path, stories260k, stories_text, assets, monkeypatch):
    monkeypatch.setenv("HF_ARCH_ASSETS", str(assets))
    out = tmp_path / "timed"
    # The zero-shot tasks (2 items each here) only where the table needs them: the source and the last stage.
    assert main(_common(stories260k, out, stories_text)[:-2] + ["--eval-limit", "2", "--task-points", "final",
                                                                "--methods", "liger", "--minutes", "0.05"]) == 0
    result = json.loads((out / "recovery.json").read_text())
    row = result["methods"][0]
    assert [("tasks" in p) for p in row["points"]] == [False, False, True] and "tasks" in result["source_eval"]
    assert all(t["items"] == 2 for t in row["points"][-1]["tasks"].values())
    assert "| liger | converted | 0 | 0.0 |" in format_table(result)  # points without tasks get "-" cells
    stage2 = row["points"][-1]
    assert row["points"][1]["skipped"] == "no new parameters"  # Liger adds none: no attention transfer
    # The budget is CPU time by default (other jobs on the machine take nothing from it); wall time is recorded too.
    assert row["budget_clock"] == "cpu" and stage2["train_seconds"] > 0
    assert stage2["steps"] >= 1 and stage2["train_cpu_seconds"] <= 0.05 * 60 * 1.5 + 5
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
    with pytest.raises(SystemExit, match=r"--generation-prompts: .*eval.txt: only \d+ documents .* asks for 500"):
        main(_common(stories260k, tmp_path / "d", stories_text) + ["--generation-prompts", "500"])
    assert not (tmp_path / "a" / "liger").exists() and not (tmp_path / "b").exists()
    assert not (tmp_path / "d" / "liger").exists()


def test_method_specs_change_conversion_options_and_recipe_fields():
    method = resolve_method("lolcats:window=128,stage2_mode=lora,lora_targets=all,stage2_lr=3e-3,mix_weights=1+0.1,"
                            "train_new=true,distill=false")
    assert method.target == "gla"
    assert method.conversion == {"method": "lolcats", "window": 128, "mix_weights": [1, 0.1]}
    assert method.recipe == {"stage2_mode": "lora", "lora_targets": "all", "stage2_lr": 0.003, "train_new": True,
                             "distill": False}

    class Args:
        batch_size, stage1_steps, stage2_steps, stage1_lr, stage2_lr, distill = 2, 3, 4, None, None, False

    stages = dict(stage_recipes("linear", "SRC", Args(), method))
    assert stages["stage1"]["training"]["learning_rate"] == 1e-2
    assert stages["stage2"]["training"]["learning_rate"] == 3e-3
    assert stages["stage2"]["lora"]["target_modules"][-3:] == ["gate_proj", "up_proj", "down_proj"]
    assert stages["stage2"]["lora"]["train_new_params"] is True and "distill" not in stages["stage2"]
    # Full fine-tuning changes the source weights, so distillation loads the source as its teacher.
    full = dict(stage_recipes("linear", "SRC", Args(), resolve_method("mamba_init:stage1=false")))
    assert list(full) == ["stage2"] and full["stage2"]["training"]["mode"] == "full"
    assert full["stage2"]["distill"]["teacher"] == "SRC" and "lora" not in full["stage2"]
    moe = dict(stage_recipes("moe", "SRC", Args(), resolve_method("moe_half:stage2_mode=full")))
    assert moe["stage2"]["training"]["mode"] == "full" and moe["stage1"]["training"]["mode"] == "patterns"
    # --compile trains every stage under torch.compile (the Trainer's own torch_compile).
    assert not any(section["training"]["torch_compile"] for section in moe.values())
    Args.compile = True
    compiled = stage_recipes("linear", "SRC", Args(), method) + stage_recipes("moe", "SRC", Args(), method)
    assert all(section["training"]["torch_compile"] for _, section in compiled)
    # The anchors' published settings are methods of their own.
    assert resolve_method("liger_paper").recipe["lora_targets"] == ("q_proj", "k_proj", "v_proj")
    assert resolve_method("lizard_paper").conversion["window"] == 128


@pytest.mark.parametrize("spec, message", [
    ("nope", "unknown method 'nope'"),
    ("lolcats:windw=3", "'windw' is neither a recipe field .* nor an option of --to gla"),
    ("lolcats:window", "'window' is not key=value"),
    ("lolcats:stage2_mode=half", "stage2_mode must be one of"),
    ("moe_half:lora_r=4", "'lora_r' is neither a recipe field"),
    ("lolcats:stage2_mode=lora,lora_targets=q_proj+qkv", r"lora_targets \['qkv'\] are not among"),
    ("lolcats:lora_r=4", r"lora_r apply to stage2_mode=lora \(this method's stage 2 is 'full'\)"),
])
def test_bad_method_specs_are_refused_by_name(spec, message):
    with pytest.raises(SystemExit, match=message):
        resolve_method(spec)


def test_processes_sharing_an_out_dir_merge_their_rows(tmp_path):
    class Args:
        overwrite, source = False, "SRC"

    path = tmp_path / "recovery.json"
    _merge_and_save(path, Args(), source_eval={"ppl": 2.0, "file": "eval.txt"})
    _merge_and_save(path, Args(), row={"method": "a", "points": [{"stage": "converted", "tokens": 0, "ppl": 3.0}]})
    _merge_and_save(path, Args(), row={"method": "b", "points": [{"stage": "converted", "tokens": 0, "ppl": 4.0}]})
    result = _merge_and_save(path, Args(), row={"method": "a", "points": [{"stage": "converted", "tokens": 0,
                                                                            "ppl": 5.0}]})
    assert [(r["method"], r["points"][0]["ppl"]) for r in result["methods"]] == [("b", 4.0), ("a", 5.0)]
    assert json.loads(path.read_text()) == result and (tmp_path / "recovery.png").stat().st_size > 0


def test_acm_keeps_its_distilled_gates_and_trains_the_learners():
    """Distillation alone would open every ACM gate (no term prices compute): the acm row trains learners only."""
    import re
    from types import SimpleNamespace

    from hf_arch.recipes.recovery_benchmark import METHODS, stage_recipes

    args = SimpleNamespace(batch_size=2, compile=False, stage1_steps=3, stage2_steps=5, stage1_lr=None, stage2_lr=None)
    stages = stage_recipes("moe", "SRC", args, METHODS["acm"])
    assert [name for name, _ in stages] == ["stage2"]
    patterns = [re.compile(p) for p in stages[0][1]["training"]["trainable_patterns"]]
    trains = lambda name: any(p.search(name) for p in patterns)  # noqa: E731
    assert trains("model.layers.0.mlp.learners.2.up_proj.weight")
    assert not trains("model.layers.0.mlp.gate_weight") and not trains("model.layers.0.mlp.gate_bias")
    routed = stage_recipes("moe", "SRC", args, METHODS["read_me_half"])
    assert [name for name, _ in routed] == ["stage1", "stage2"]
    assert any(re.search(p, "model.pre_gate.up.weight") for p in routed[0][1]["training"]["trainable_patterns"])
