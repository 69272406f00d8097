"""hf-arch train backend: recipe schema, data packing, the three training modes, NaN guard, resume, output dir."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from hf_arch.recipes.data import DataError, PadCollator, build_datasets, load_documents, tokenize_and_pack
from hf_arch.recipes.runner import (
    NanLossCallback,
    OutputDirExistsError,
    TimeBudgetCallback,
    TrainingDivergedError,
    build_param_groups,
    run_recipe,
)
from hf_arch.recipes.schema import DataConfig, load_recipe

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "recipes" / "configs"
GATE_LR_SCALE = 4.0
SENTENCE = "Once upon a time, there was a little girl named Lily. She loved to play outside in the park."


# ------------------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def tokenizer(stories260k):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(stories260k)


@pytest.fixture(scope="module")
def gated_dir(tmp_path_factory, stories260k, tokenizer):
    """A tiny gated-attention checkpoint (from config, zero-init headwise gates) with the stories260K tokenizer."""
    import hf_arch
    from transformers import AutoModelForCausalLM

    config = hf_arch.GatedAttentionConfig(
        vocab_size=512, hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=4, attn_output_gate="headwise", attn_output_gate_scale=2.0,
        attn_output_gate_init="zeros", attn_output_gate_lr_scale=GATE_LR_SCALE,
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("gated")
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    (path / "hf_arch_conversion.json").write_text(json.dumps({"source": "from_config (test)"}))
    return path


@pytest.fixture(scope="module")
def stories_file(tmp_path_factory, assets):
    """The first ~24 KB of TinyStories (whole stories, separated by <|endoftext|> lines)."""
    text = (assets / "data" / "tinystories_2mib.txt").read_text(encoding="utf-8")[:24_000]
    path = tmp_path_factory.mktemp("data") / "stories.txt"
    path.write_text(text, encoding="utf-8")
    return path


def make_recipe(tmp_path: Path, model: Path, train_file: Path, **sections) -> Path:
    recipe = {
        "model": str(model),
        "output_dir": str(tmp_path / "out"),
        "data": {"train_file": str(train_file), "document_separator": "<|endoftext|>", "block_size": 64},
        "training": {"mode": "full", "max_steps": 3, "learning_rate": 1e-3, "per_device_train_batch_size": 4,
                     "logging_steps": 1, "save_steps": 100},
    }
    for section, values in sections.items():
        if isinstance(values, dict):
            recipe.setdefault(section, {}).update(values)
        else:
            recipe[section] = values
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def state_dict(path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def changed_keys(before: dict, after: dict) -> set[str]:
    assert before.keys() == after.keys()
    return {k for k in before if not torch.equal(before[k], after[k])}


# -------------------------------------------------------------------------------------------------------------- schema


def test_schema_defaults_overrides_and_env(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HF_ARCH_ASSETS", raising=False)
    path = tmp_path / "r.yaml"
    path.write_text(
        "model: ./m\noutput_dir: ./o\ndata:\n  train_file: ${HF_ARCH_ASSETS}/data/x.txt\n"
        "training:\n  mode: lora\n  learning_rate: 1e-4\n"
    )
    recipe = load_recipe(path, ["training.max_steps=5", "lora.r=4", "lora.target_modules=[q_proj, v_proj]",
                                "data.eval_file=null", "training.logging_first_step=false"])
    assert recipe.training.max_steps == 5 and recipe.lora.r == 4 and recipe.training.logging_first_step is False
    assert recipe.lora.target_modules == ["q_proj", "v_proj"]
    assert recipe.training.learning_rate == pytest.approx(1e-4)  # YAML reads "1e-4" as a string: accepted
    assert recipe.training.mode == "lora" and recipe.data.block_size == 256 and recipe.data.packing is True
    assert recipe.model == str(tmp_path / "m") and recipe.output_dir == str(tmp_path / "o")
    assert recipe.data.train_file == str((tmp_path / "../shared/assets/data/x.txt").resolve())
    monkeypatch.setenv("HF_ARCH_ASSETS", "/elsewhere")
    assert load_recipe(path).data.train_file == "/elsewhere/data/x.txt"
    # a Recipe object can be re-overridden
    assert load_recipe(recipe, ["training.max_steps=7"]).training.max_steps == 7


def test_training_section_is_transformers_training_arguments(tmp_path, monkeypatch):
    """Every TrainingArguments field works in training:, with the recipe's defaults and derived values."""
    from transformers import TrainingArguments
    from transformers.trainer_utils import IntervalStrategy

    monkeypatch.chdir(tmp_path)
    # transformers 5.2x renamed gradient_checkpointing (the old name still works, with a deprecation warning)
    checkpointing = ("activation_checkpointing" if "activation_checkpointing" in TrainingArguments.__dataclass_fields__
                     else "gradient_checkpointing")
    path = tmp_path / "r.yaml"
    path.write_text("model: m\noutput_dir: o\ndata: {train_file: x.txt, eval_file: e.txt}\n"
                    "training:\n  lr_scheduler_type: cosine_with_min_lr\n  lr_scheduler_kwargs: {min_lr: 1.0e-5}\n"
                    "  report_to: [none]\n  eval_steps: 5\n  seed: 3\n")
    recipe = load_recipe(path, ["training.optim=sgd", f"training.{checkpointing}=true"])
    t = recipe.training
    assert isinstance(t, TrainingArguments) and t.output_dir == str(tmp_path / "o")
    assert t.optim == "sgd" and t.lr_scheduler_kwargs == {"min_lr": 1e-5} and t.report_to == []
    assert t.eval_strategy == IntervalStrategy.STEPS and t.eval_steps == 5 and t.data_seed == 3
    assert (t.learning_rate, t.logging_steps, t.save_total_limit, t.mode, t.objective) == (5e-4, 10, 2, "full", "lm")
    assert getattr(t, checkpointing) and getattr(t, f"{checkpointing}_kwargs") == {"use_reentrant": False}
    assert recipe.to_dict()["training"]["optim"] == "sgd"


@pytest.mark.parametrize(
    "body, overrides, match",
    [
        ("model: m\noutput_dir: o\ndata: {train_file: x.txt}\ntraining: {max_stepz: 3}\n", [], "training.max_stepz"),
        ("model: m\noutput_dir: o\ndata: {train_file: x.txt}\nfoo: 1\n", [], "'foo'"),
        ("model: m\noutput_dir: o\ndata: {train_file: x.txt}\n", ["training.nope=1"], "training.nope"),
        ("model: m\noutput_dir: o\ndata: {train_file: x.txt}\n", ["training.max_steps=abc"], "training.max_steps"),
        ("model: m\noutput_dir: o\ndata: {train_file: x.txt}\n", ["training.mode=partial"], "training.mode"),
        ("model: m\noutput_dir: o\ndata: {train_file: x.txt, packing: 3}\n", [], "data.packing"),
        ("model: m\ndata: {train_file: x.txt}\n", [], "output_dir"),
        ("model: m\noutput_dir: o\ndata: {train_file: x.txt}\n", ["data.block_size=0"], "data.block_size"),
        ("model: m\noutput_dir: o\ndata: {train_file: x.txt}\n", ["training.max_steps"], "key=value"),
        ("model: m\noutput_dir: o\ndata: {train_file: x.txt}\n", ["training.mode=patterns"], "trainable_patterns"),
        ("model: m\noutput_dir: o\ndata: {train_file: x.txt}\n", ["training.trainable_patterns=[a]"],
         "read in training.mode 'patterns' only"),
        ("model: m\noutput_dir: o\ndata: {train_file: x.txt}\n", ["training.mode=patterns",
                                                              "training.trainable_patterns=['(']"], "not a regex"),
        ("model: m\noutput_dir: o\ndata: {train_file: x.txt}\n", ["training.objective=attention_transfer"],
         "use training.mode new_params or patterns"),
        ("model: m\noutput_dir: o\ndata: {train_file: x.txt}\n", ["distill.teacher=self"],
         "distill.teacher 'self' needs frozen source weights"),
        ("model: m\noutput_dir: o\ndata: {train_file: x.txt}\n", ["distill.teacher=t", "distill.temperature=0"],
         "distill.temperature"),
        ("model: m\noutput_dir: o\ndata: {train_file: x.txt}\n", ["training.optim=adamz"], "training.optim.*invalid choice"),
        ("model: m\noutput_dir: o\ndata: {train_file: x.txt}\n", ["training.output_dir=x"], "top level"),
        ("model: m\noutput_dir: o\ndata: {train_file: x.txt}\ntraining: {max_steps: [1, 2]}\n", [],
         "training.max_steps' takes one value"),
        ("model: m\noutput_dir: o\ndata: {train_file: x.txt}\ntraining: {lerning_rate: 1}\n", [],
         "did you mean 'learning_rate'"),
        ("model: m\noutput_dir: o\ndata: {train_file: x.txt}\ntraining: 3\n", [], "training must be a mapping"),
        ("model: m\noutput_dir: o\ndata: {train_file: x.txt}\n", ["training.sequence_parallel_size=0"],
         "'training.sequence_parallel_size' must be >= 1"),
        ("model: m\noutput_dir: o\ndata: {train_file: x.txt}\n", ["training.sequence_parallel_size=2",
                                                              "distill.teacher=t"], "next-token objective only"),
        ("model: m\noutput_dir: o\ndata: {train_file: x.txt}\n", ["training.sequence_parallel_size=4",
                                                              "data.block_size=2"], "cannot be split across"),
    ],
)
def test_schema_errors_name_key_and_file(tmp_path, body, overrides, match):
    path = tmp_path / "bad_recipe.yaml"
    path.write_text(body)
    with pytest.raises(ValueError, match=match) as info:
        load_recipe(path, overrides)
    assert "bad_recipe.yaml" in str(info.value)


def test_shipped_configs_load(monkeypatch):
    monkeypatch.chdir(REPO)
    main = load_recipe(CONFIGS / "gated_attention_tinystories.yaml", ["model=/some/converted"])
    assert main.training.mode == "new_params" and main.data.block_size == 256
    assert main.model == "/some/converted"
    assert Path(main.data.train_file).name == "tinystories_2mib.txt"
    lora = load_recipe(CONFIGS / "lora_example.yaml")
    assert lora.training.mode == "lora" and lora.lora.merge_on_save
    stage1 = load_recipe(CONFIGS / "linearize_stage1_attention_transfer.yaml")
    assert (stage1.training.mode, stage1.training.objective) == ("new_params", "attention_transfer")
    full = load_recipe(CONFIGS / "linearize_stage2_full.yaml", ["distill.teacher=/src"])
    assert full.training.mode == "full" and full.distill.teacher == "/src"
    stage2 = load_recipe(CONFIGS / "linearize_stage2_lora.yaml")
    assert stage2.training.mode == "lora" and stage2.distill.teacher == "self"
    router = load_recipe(CONFIGS / "moe_router_warmup.yaml", ["distill.teacher=./dense"])
    assert router.training.trainable_patterns == [r"\.router\."] and Path(router.distill.teacher).is_absolute()
    experts = load_recipe(CONFIGS / "moe_experts_finetune.yaml")
    assert experts.training.mode == "patterns" and len(experts.training.trainable_patterns) == 4


# ---------------------------------------------------------------------------------------------------------------- data


def test_packing_blocks_labels_bos(tmp_path, tokenizer):
    docs = [f"Story number {i}. " + SENTENCE * (1 + i % 3) for i in range(12)]
    path = tmp_path / "docs.txt"
    path.write_text("\n<|endoftext|>\n".join(docs) + "\n")
    cfg = DataConfig(train_file=str(path), document_separator="<|endoftext|>", block_size=16)
    loaded = load_documents(path, cfg)
    assert loaded["text"] == docs
    packed = tokenize_and_pack(loaded, tokenizer, cfg)
    stream = [t for d in docs for t in [tokenizer.bos_token_id] + tokenizer(d, add_special_tokens=False)["input_ids"]]
    assert len(packed) == len(stream) // 16
    assert all(len(ids) == 16 for ids in packed["input_ids"])
    assert packed["input_ids"] == packed["labels"]
    assert [t for ids in packed["input_ids"] for t in ids] == stream[: len(packed) * 16]
    assert packed[0]["input_ids"][0] == 1 and tokenizer.eos_token_id not in stream

    # default split: blank-line separated paragraphs; no packing: one (truncated) example per document, BOS first
    para = tmp_path / "paragraphs.txt"
    para.write_text("First paragraph.\nstill first.\n\n\nSecond one.\n   \nThird.\n")
    cfg2 = DataConfig(train_file=str(para), block_size=4, packing=False, add_eos=True)
    examples = tokenize_and_pack(load_documents(para, cfg2), tokenizer, cfg2)
    assert len(examples) == 3 and all(ids[0] == 1 and len(ids) <= 4 for ids in examples["input_ids"])
    batch = PadCollator(0)([examples[0], {"input_ids": [1, 5], "labels": [1, 5]}])
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert batch["labels"][1, 2:].eq(-100).all() and batch["attention_mask"][1].tolist()[:2] == [1, 1]

    # max_documents / max_train_samples
    cfg3 = DataConfig(train_file=str(path), document_separator="<|endoftext|>", block_size=16, max_documents=2,
                      max_train_samples=1)
    train, evaluation = build_datasets(cfg3, tokenizer)
    assert len(train) == 1 and evaluation is None


def test_jsonl_text_field(tmp_path, tokenizer):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps({"instruction": SENTENCE, "id": i}) for i in range(8)) + "\n")
    cfg = DataConfig(train_file=str(path), text_field="instruction", block_size=32)
    train, _ = build_datasets(cfg, tokenizer)
    assert len(train) > 0 and train.column_names == ["input_ids", "labels"]


@pytest.mark.parametrize("case", ["missing", "empty", "blank", "no_field", "not_jsonl", "too_short"])
def test_data_errors(tmp_path, tokenizer, case):
    path = tmp_path / ("d.jsonl" if case in ("no_field", "not_jsonl") else "d.txt")
    match = str(path.name)
    if case == "empty":
        path.write_text("")
        match = "is empty"
    elif case == "blank":
        path.write_text("\n\n<|endoftext|>\n  \n")
        match = "no non-empty documents"
    elif case == "no_field":
        path.write_text(json.dumps({"instruction": "hi"}) + "\n")
        match = "no field 'text'"
    elif case == "not_jsonl":
        path.write_text("this is plain text\nnot json at all\n")
        match = "could not be read as JSON lines"
    elif case == "too_short":
        path.write_text("Hi.\n")
        match = "fewer than one block"
    elif case == "missing":
        match = "does not exist"
    cfg = DataConfig(train_file=str(path), block_size=64, document_separator="<|endoftext|>")
    with pytest.raises(DataError, match=match) as info:
        build_datasets(cfg, tokenizer)
    assert path.name in str(info.value) or case == "too_short"


# ---------------------------------------------------------------------------------------------------------- optimizer


def test_param_groups_scale_gate_lr(gated_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(gated_dir)
    groups = build_param_groups(model, 1e-3, 0.1, model.config.attn_output_gate_lr_scale)
    by_name = {g["name"]: g for g in groups}
    assert by_name["output_gate"]["lr"] == pytest.approx(1e-3 * GATE_LR_SCALE)
    assert by_name["base"]["lr"] == pytest.approx(1e-3) and by_name["base_no_decay"]["weight_decay"] == 0.0
    n_gate = sum(p.numel() for g in groups if g["name"].startswith("output_gate") for p in g["params"])
    assert n_gate == sum(p.numel() for n, p in model.named_parameters() if "output_gate" in n)
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_param_groups_scale_only_the_softmax_attention_output_gate():
    """A hybrid GLA model: the linear layer's ``output_gate_proj`` (its gated RMSNorm) keeps the base LR; only the
    softmax layer's ``AttentionOutputGate`` (here low rank: two linears) is scaled."""
    import hf_arch
    from transformers import AutoModelForCausalLM

    from hf_arch.layers.output_gate import AttentionOutputGate

    config = hf_arch.GLAConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, full_attention_layers=[1], attn_output_gate="headwise", attn_output_gate_rank=2,
        attn_output_gate_lr_scale=GATE_LR_SCALE,
    )
    model = AutoModelForCausalLM.from_config(config)
    linear_gate = model.model.layers[0].self_attn.output_gate_proj
    softmax_gate = model.model.layers[1].self_attn.output_gate
    assert isinstance(linear_gate, torch.nn.Linear) and isinstance(softmax_gate, AttentionOutputGate)

    groups = build_param_groups(model, 1e-3, 0.1, config.attn_output_gate_lr_scale)
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    scaled = {id(p) for g in groups if g["name"].startswith("output_gate") for p in g["params"]}
    assert scaled == {id(p) for p in softmax_gate.parameters()} and len(scaled) == 2
    assert all(lr_of[id(p)] == pytest.approx(1e-3 * GATE_LR_SCALE) for p in softmax_gate.parameters())
    assert lr_of[id(linear_gate.weight)] == pytest.approx(1e-3)
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_nan_callback_message():
    class State:
        global_step = 7

    with pytest.raises(TrainingDivergedError, match="loss became NaN at step 7; lower the learning rate"):
        NanLossCallback(1e6).on_log(None, State(), None, logs={"loss": float("nan")})
    NanLossCallback(1e-3).on_log(None, State(), None, logs={"loss": 1.0})


def test_time_budget_counts_wall_or_cpu_time():
    """A CPU-time budget ignores time the process spends waiting (another job holding the core); a wall one does not."""
    import time
    from types import SimpleNamespace

    def step(callback):
        control = SimpleNamespace(should_training_stop=False)
        callback.on_step_end(None, SimpleNamespace(global_step=3), control)
        return control.should_training_stop

    wall, cpu = TimeBudgetCallback(0.001, "wall"), TimeBudgetCallback(0.001, "cpu")  # 0.06 s each
    for callback in (wall, cpu):
        callback.on_train_begin(None, None, None)
    time.sleep(0.2)  # waiting: wall time passes, CPU time hardly does
    assert step(wall) and wall.stopped_at_step == 3
    assert not step(cpu) and cpu.stopped_at_step is None
    busy_until = time.process_time() + 0.1
    while time.process_time() < busy_until:  # working: now CPU time passes too
        pass
    assert step(cpu) and cpu.stopped_at_step == 3
    with pytest.raises(ValueError, match="training.budget_clock must be one of \\['cpu', 'wall'\\], got 'gpu'"):
        TimeBudgetCallback(1.0, "gpu")


# -------------------------------------------------------------------------------------------------------------- modes


@pytest.fixture(scope="module")
def new_params_run(tmp_path_factory, gated_dir, stories_file):
    tmp = tmp_path_factory.mktemp("new_params")
    recipe = make_recipe(tmp, gated_dir, stories_file, training={"mode": "new_params", "max_steps": 3,
                                                                 "learning_rate": 1e-2})
    return recipe, run_recipe(recipe)


def test_new_params_trains_only_output_gates(new_params_run, gated_dir):
    _, summary = new_params_run
    final = Path(summary["output_dir"]) / "final"
    changed = changed_keys(state_dict(gated_dir), state_dict(final))
    gate_keys = {k for k in state_dict(gated_dir) if "output_gate" in k}
    assert gate_keys and changed == gate_keys
    assert summary["mode"] == "new_params" and summary["steps"] == 3
    assert summary["trainable_parameters"] == 2 * 8 * 64  # 2 layers × headwise gate (8 heads × hidden 64)
    assert summary["total_parameters"] > summary["trainable_parameters"]


def test_final_dir_contents(new_params_run):
    _, summary = new_params_run
    out = Path(summary["output_dir"])
    final = out / "final"
    assert not (out / ".final.partial").exists()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "hf_arch_training.json",
                 "hf_arch_conversion.json"):
        assert (final / name).is_file(), name
    record = json.loads((final / "hf_arch_training.json").read_text())
    assert record["recipe"]["training"]["mode"] == "new_params"
    assert set(record["versions"]) >= {"torch", "transformers", "peft"}
    assert record["data_files"]["train_file"].endswith("stories.txt")
    assert [p["step"] for p in record["loss_curve"]] == [1, 2, 3]
    assert record["summary"]["loss_start"] == summary["loss_start"]
    # the fine-tuned model still loads without hf_arch: flat modeling files and auto_map are re-exported
    assert (final / "modeling_hf_arch.py").is_file() and (final / "configuration_hf_arch.py").is_file()
    assert "AutoModelForCausalLM" in json.loads((final / "config.json").read_text())["auto_map"]
    assert (final / "loss.png").is_file()


def test_output_dir_refused_unless_overwrite(new_params_run):
    recipe, _ = new_params_run
    with pytest.raises(OutputDirExistsError, match="already holds a final model"):
        run_recipe(recipe)


def test_new_params_on_plain_llama_is_a_clear_error(tmp_path, stories260k, stories_file):
    recipe = make_recipe(tmp_path, stories260k, stories_file, training={"mode": "new_params"})
    with pytest.raises(ValueError, match="no new parameters"):
        run_recipe(recipe)


def test_full_mode_changes_every_tensor_and_scales_gate_lr(tmp_path, gated_dir, stories_file):
    from transformers import TrainerCallback

    seen = {}

    class Spy(TrainerCallback):
        def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
            seen.update({g["name"]: g["initial_lr"] if "initial_lr" in g else g["lr"] for g in optimizer.param_groups})

    recipe = make_recipe(tmp_path, gated_dir, stories_file, training={"max_steps": 2})
    summary = run_recipe(recipe, callbacks=[Spy()])
    before, after = state_dict(gated_dir), state_dict(tmp_path / "out" / "final")
    assert changed_keys(before, after) == set(before)
    assert summary["trainable_parameters"] == summary["total_parameters"]
    assert seen["output_gate"] == pytest.approx(GATE_LR_SCALE * seen["base"])


def test_lora_merged_final_differs_and_reloads(tmp_path, gated_dir, stories_file):
    from transformers import AutoModelForCausalLM

    recipe = make_recipe(tmp_path, gated_dir, stories_file, training={"mode": "lora", "learning_rate": 1e-2},
                         lora={"r": 4, "alpha": 8})
    summary = run_recipe(recipe)
    final = tmp_path / "out" / "final"
    model = AutoModelForCausalLM.from_pretrained(final)  # a plain (merged) model, no adapter files needed
    assert type(model).__name__ == "GatedAttentionForCausalLM"
    assert not (final / "adapter_config.json").exists()
    before, after = state_dict(gated_dir), state_dict(final)
    changed = changed_keys(before, after)
    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "output_gate.proj")
    assert changed and all(any(t in k for t in targets) for k in changed)
    assert any("output_gate" in k for k in changed)  # the variant's targets include the gate projection
    assert summary["trainable_parameters"] < summary["total_parameters"] / 2


def test_loss_decreases_on_repeated_data(tmp_path, gated_dir):
    data = tmp_path / "repeat.txt"
    data.write_text("\n<|endoftext|>\n".join([SENTENCE] * 40) + "\n")
    recipe = make_recipe(tmp_path, gated_dir, data, data={"block_size": 32},
                         training={"max_steps": 20, "learning_rate": 3e-3, "logging_steps": 5})
    summary = run_recipe(recipe)
    assert summary["steps"] == 20
    assert summary["loss_end"] < summary["loss_start"] - 1.5, summary["loss_curve"]


def test_nan_loss_stops_with_clear_error(tmp_path, gated_dir, stories_file):
    recipe = make_recipe(tmp_path, gated_dir, stories_file, training={"learning_rate": 1e6, "max_steps": 30})
    with pytest.raises(TrainingDivergedError, match=r"loss became (NaN|inf) at step \d+; lower the learning rate"):
        run_recipe(recipe)
    assert not (tmp_path / "out" / "final").exists()


def test_resume_continues_to_max_steps(tmp_path, gated_dir, stories_file):
    recipe = make_recipe(tmp_path, gated_dir, stories_file, training={"max_steps": 2, "save_steps": 2})
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        run_recipe(recipe, resume=True)
    first = run_recipe(recipe)
    assert first["steps"] == 2 and (tmp_path / "out" / "checkpoint-2").is_dir()
    second = run_recipe(recipe, ["training.max_steps=4"], resume=True)
    assert second["steps"] == 4 and second["resumed_from"].endswith("checkpoint-2")
    assert [s for s, _ in second["loss_curve"]] == [1, 2, 3, 4]  # log history restored, steps 3-4 trained
    assert (tmp_path / "out" / "checkpoint-4").is_dir()
    record = json.loads((tmp_path / "out" / "final" / "hf_arch_training.json").read_text())
    assert record["summary"]["steps"] == 4
    # overwrite starts from scratch
    third = run_recipe(recipe, overwrite=True)
    assert third["steps"] == 2 and third["resumed_from"] is None
    assert not (tmp_path / "out" / "checkpoint-4").exists()


# --------------------------------------------------------------------------------------------------------- distributed


@pytest.mark.slow
def test_accelerate_launch_two_cpu_processes(tmp_path, gated_dir, stories_file):
    """Two gloo CPU processes via `accelerate launch`. `--cpu` alone runs a single process (accelerate's simple
    launcher), so this uses torchrun (`--multi_gpu`) with ACCELERATE_USE_CPU=true, which selects CPU + gloo."""
    recipe = make_recipe(tmp_path, gated_dir, stories_file, training={"mode": "new_params", "max_steps": 3,
                                                                      "learning_rate": 1e-2})
    script = tmp_path / "launch.py"
    script.write_text(
        "import json, os, sys\n"
        "from hf_arch.recipes.runner import run_recipe\n"
        "s = run_recipe(sys.argv[1])\n"
        # one file per rank: the two processes' stdout lines interleave
        "open(f\"summary_{os.environ['RANK']}.json\", 'w').write(json.dumps({k: s[k] for k in ('steps', 'world_size')}))\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "ACCELERATE_USE_CPU": "true",
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    accelerate = Path(sys.executable).with_name("accelerate")
    cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
           str(script), str(recipe)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summaries = sorted(tmp_path.glob("summary_*.json"))
    assert [p.name for p in summaries] == ["summary_0.json", "summary_1.json"], proc.stdout[-2000:]
    assert all(json.loads(p.read_text()) == {"steps": 3, "world_size": 2} for p in summaries)
    out = tmp_path / "out"
    assert (out / "final" / "model.safetensors").is_file() and (out / "final" / "hf_arch_training.json").is_file()
    assert not (out / ".final.partial").exists() and not (out / ".final.old").exists()


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory, stories260k, tokenizer):
    """A tiny MoE++ checkpoint (zero/copy/constant experts, a shared expert) with the stories260K tokenizer."""
    import hf_arch
    from transformers import AutoModelForCausalLM

    config = hf_arch.MoEConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=4, moe_preset="moe_plus_plus", num_experts=4, moe_intermediate_size=32,
        num_shared_experts=1,
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("moe")
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_lora_on_moe_merges_into_the_expert_tensors_and_logs_routing(tmp_path, moe_dir, stories_file):
    recipe = make_recipe(tmp_path, moe_dir, stories_file, training={"mode": "lora", "learning_rate": 1e-2},
                         lora={"r": 4, "alpha": 8})
    run_recipe(recipe)
    changed = changed_keys(state_dict(moe_dir), state_dict(tmp_path / "out" / "final"))
    # LoRA reached the 3-D expert weights (target_parameters) as well as the linear projections.
    assert {"model.layers.0.mlp.experts.gate_up_proj", "model.layers.1.mlp.experts.down_proj"} <= changed
    assert not any("router" in k for k in changed)
    record = json.loads((tmp_path / "out" / "final" / "hf_arch_training.json").read_text())
    logged = [entry for entry in record["log_history"] if "loss" in entry]
    assert logged and all("moe/zero_computation_share" in entry for entry in logged)


def test_router_warmup_trains_only_routers_with_distillation(tmp_path, moe_dir, stories260k, stories_file):
    recipe = make_recipe(tmp_path, moe_dir, stories_file,
                         training={"mode": "patterns", "trainable_patterns": [r"\.router\."], "max_steps": 2},
                         distill={"teacher": str(stories260k), "temperature": 2.0})
    summary = run_recipe(recipe)
    assert Path(summary["distill_teacher"]) == Path(stories260k).resolve() and summary["loss_start"] > 0
    changed = changed_keys(state_dict(moe_dir), state_dict(tmp_path / "out" / "final"))
    assert changed and all(".router." in k for k in changed)
    assert summary["trainable_parameters"] == sum(
        v.numel() for k, v in state_dict(moe_dir).items() if ".router." in k)


@pytest.fixture(scope="module")
def lolcats_dir(tmp_path_factory, stories260k):
    """stories260K linearized with the LoLCATs preset (Hedgehog maps + window branch are the new parameters)."""
    from hf_arch.conversion import convert

    path = tmp_path_factory.mktemp("lin") / "lolcats"
    convert(stories260k, path, to="gla", method="lolcats", window=16)
    return path


def test_attention_transfer_trains_only_new_parameters_and_lowers_the_mse(tmp_path, lolcats_dir, stories_file):
    recipe = make_recipe(tmp_path, lolcats_dir, stories_file,
                         training={"mode": "new_params", "objective": "attention_transfer", "max_steps": 20,
                                   "learning_rate": 1e-2, "logging_steps": 1})
    summary = run_recipe(recipe)
    assert summary["objective"] == "attention_transfer"
    losses = [loss for _, loss in summary["loss_curve"]]
    assert sum(losses[-4:]) / 4 < 0.85 * sum(losses[:4]) / 4, losses
    changed = changed_keys(state_dict(lolcats_dir), state_dict(tmp_path / "out" / "final"))
    assert changed and all(k.endswith(("feature_map", "window_factor")) for k in changed), changed


def test_lora_can_also_train_the_converted_models_new_parameters(tmp_path, lolcats_dir, stories_file, stories260k):
    recipe = make_recipe(tmp_path, lolcats_dir, stories_file, training={"mode": "lora", "max_steps": 3,
                                                                         "learning_rate": 1e-2},
                         lora={"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"], "train_new_params": True})
    run_recipe(recipe)
    changed = changed_keys(state_dict(lolcats_dir), state_dict(tmp_path / "out" / "final"))
    assert any(k.endswith("feature_map") for k in changed), changed  # trained at full rank
    assert any(k.endswith("q_proj.weight") for k in changed)  # LoRA merged
    assert not any(k.endswith(("k_proj.weight", "o_proj.weight", "mlp.up_proj.weight")) for k in changed)
    # Without the flag the new parameters stay frozen under LoRA.
    (tmp_path / "plain").mkdir()
    (tmp_path / "llama").mkdir()
    plain = make_recipe(tmp_path / "plain", lolcats_dir, stories_file, training={"mode": "lora", "max_steps": 3,
                                                                                  "learning_rate": 1e-2},
                        lora={"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]})
    run_recipe(plain)
    changed = changed_keys(state_dict(lolcats_dir), state_dict(tmp_path / "plain" / "out" / "final"))
    assert changed and not any(k.endswith("feature_map") for k in changed), changed
    with pytest.raises(ValueError, match="lora.train_new_params: .* has no new parameters"):
        run_recipe(make_recipe(tmp_path / "llama", stories260k, stories_file, training={"mode": "lora", "max_steps": 1},
                               lora={"r": 4, "train_new_params": True}))


def test_lora_with_self_distillation_needs_no_teacher_copy(tmp_path, lolcats_dir, stories_file, stories260k):
    from hf_arch.recipes.objectives import DistillationTeacher

    recipe = make_recipe(tmp_path, lolcats_dir, stories_file, training={"mode": "lora", "max_steps": 2},
                         lora={"r": 4, "alpha": 8}, distill={"teacher": "self"})
    summary = run_recipe(recipe)
    assert summary["distill_teacher"] == "self" and summary["loss_start"] > 0

    # The "self" teacher is the source function: its logits equal the unconverted stories260K's.
    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_pretrained(lolcats_dir).eval()
    source = AutoModelForCausalLM.from_pretrained(stories260k).eval()
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    teacher = DistillationTeacher("self", student, temperature=1.0).logits(student, {"input_ids": ids})
    with torch.no_grad():
        torch.testing.assert_close(teacher, source(ids).logits, rtol=1e-5, atol=1e-5)
        assert (student(ids).logits - teacher).abs().max() > 1e-3  # the student itself is not the teacher
    assert not student.training


@pytest.fixture(scope="module")
def sparse_dirs(tmp_path_factory, stories260k):
    """stories260K with SeerAttention gates and with Flux routers (blocks of 16 tokens)."""
    from hf_arch.conversion import convert

    root = tmp_path_factory.mktemp("sparse")
    convert(stories260k, root / "seer", to="sparse_attention", method="seer", block_size=16)
    convert(stories260k, root / "flux", to="sparse_attention", method="flux", block_size=16, window_blocks=1,
            router_bias=0.5, target_sparsity=0.9)
    return root


def test_gate_distillation_trains_only_the_gates_and_lowers_the_kl(tmp_path, sparse_dirs, stories_file):
    recipe = make_recipe(tmp_path, sparse_dirs / "seer", stories_file,
                         training={"mode": "new_params", "objective": "gate_distillation", "max_steps": 15,
                                   "learning_rate": 3e-2, "logging_steps": 1})
    summary = run_recipe(recipe)
    losses = [loss for _, loss in summary["loss_curve"]]
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3, losses
    changed = changed_keys(state_dict(sparse_dirs / "seer"), state_dict(tmp_path / "out" / "final"))
    assert changed and all(".block_gate." in k for k in changed), changed


def test_flux_router_training_distills_from_itself_and_moves_only_routers(tmp_path, sparse_dirs, stories_file):
    recipe = make_recipe(tmp_path, sparse_dirs / "flux", stories_file,
                         training={"mode": "new_params", "max_steps": 4, "learning_rate": 1e-2},
                         distill={"teacher": "self", "kl_weight": 1.0, "lm_weight": 0.0})
    summary = run_recipe(recipe)
    assert summary["distill_teacher"] == "self"
    changed = changed_keys(state_dict(sparse_dirs / "flux"), state_dict(tmp_path / "out" / "final"))
    assert any(".layer_router." in k for k in changed)
    assert changed <= {k for k in changed if ".layer_router." in k} | {"model.sparsity_multipliers"}
    # The multipliers ascend (the target 0.9 is above the initial sparse share), at their own learning rate.
    after = state_dict(tmp_path / "out" / "final")["model.sparsity_multipliers"]
    assert after[0] < 0


def test_param_groups_give_the_lagrange_multipliers_their_own_rate_and_no_decay(sparse_dirs):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(sparse_dirs / "flux")
    groups = build_param_groups(model, 1e-3, 0.1, 1.0, multiplier_lr_scale=10.0)
    [lagrange] = [g for g in groups if g["name"] == "lagrange_multipliers"]
    assert lagrange["params"] == [model.model.sparsity_multipliers]
    assert lagrange["lr"] == pytest.approx(1e-2) and lagrange["weight_decay"] == 0.0
    assert all(model.model.sparsity_multipliers is not p for g in groups if g is not lagrange for p in g["params"])
