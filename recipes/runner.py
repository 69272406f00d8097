"""``hf-arch train RECIPE.yaml [key=value ...] [--resume]``: run a training recipe with 🤗 Trainer.

Layout of ``output_dir``::

    checkpoint-N/            Trainer checkpoints (every training.save_steps, at most save_total_limit)
    final/                   the trained model + tokenizer (a full model; LoRA adapters merged unless
                             lora.merge_on_save is false), hf_arch_training.json, loss.png (if matplotlib)
                             and a copy of the source model's hf_arch_conversion.json
    .final.partial/          final/ while it is being written (renamed when complete)

Modes (``training.mode``): ``full`` trains everything, ``lora`` trains a peft LoRA adapter on the variant's
projections, ``new_params`` trains only the parameters the variant adds to a Llama-family source
(``hf_arch.new_parameter_names``). The parameters of the softmax attention's output gate (its
``AttentionOutputGate`` module, LoRA factors on it included) get ``learning_rate × config.attn_output_gate_lr_scale``;
the linear-attention layers' ``output_gate_proj`` keeps the base learning rate.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import time
from pathlib import Path
from typing import Iterable

import torch
import transformers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    Trainer,
    TrainerCallback,
)
from transformers.trainer_utils import get_last_checkpoint

from ..atomic_io import replace_dir
from ..sequence_parallel import SequenceParallelMixin
from .data import PadCollator, build_datasets
from .moe_logging import RoutingStatsCallback, has_moe_layers
from .objectives import (
    DistillationTeacher,
    attention_transfer_loss,
    distillation_loss,
    gate_distillation_loss,
    training_regularizer,
)
from .schema import Recipe, load_recipe

MULTIPLIER_PATTERN = "sparsity_multipliers"  # Flux Lagrange multipliers: own learning rate, no decay
FINAL_DIR = "final"
PARTIAL_DIR = ".final.partial"
TRAINING_JSON = "hf_arch_training.json"
CONVERSION_JSON = "hf_arch_conversion.json"


class TrainingDivergedError(RuntimeError):
    """The training loss became NaN or infinite."""


class TimeBudgetCallback(TrainerCallback):
    """Stops training at the first step end past ``minutes`` since training began, counted on ``clock``: ``"wall"``
    (elapsed time) or ``"cpu"`` (this process's CPU time, all its threads)."""

    CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}

    def __init__(self, minutes: float, clock: str = "wall"):
        if not minutes > 0:
            raise ValueError(f"training.max_train_minutes must be > 0, got {minutes!r}")
        if clock not in self.CLOCKS:
            raise ValueError(f"training.budget_clock must be one of {sorted(self.CLOCKS)}, got {clock!r}")
        self.seconds = 60.0 * minutes
        self.now = self.CLOCKS[clock]
        self.started = None
        self.stopped_at_step = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.started = self.now()

    def on_step_end(self, args, state, control, **kwargs):
        if self.now() - self.started >= self.seconds and not control.should_training_stop:
            control.should_training_stop = True
            self.stopped_at_step = state.global_step


class OutputDirExistsError(FileExistsError):
    """output_dir already holds a final model or checkpoints and neither overwrite nor resume was asked for."""


class NanLossCallback(TrainerCallback):
    """Stops the run with :class:`TrainingDivergedError` when a logged training loss is NaN/inf."""

    def __init__(self, learning_rate: float):
        self.learning_rate = learning_rate

    def on_log(self, args, state, control, logs=None, **kwargs):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            raise TrainingDivergedError(
                f"loss became {'NaN' if math.isnan(float(loss)) else 'inf'} at step {state.global_step}; lower the "
                f"learning rate (training.learning_rate={self.learning_rate:g}), keep training.max_grad_norm > 0, "
                "add warmup_steps, or check the data / the model's weights for NaNs"
            )


def _is_attention_output_gate(module: torch.nn.Module) -> bool:
    """The softmax attention's output gate: ``hf_arch.layers.output_gate.AttentionOutputGate``, or the same class in a
    checkpoint's flat remote-code file (loaded with ``trust_remote_code``, where it is a different class object)."""
    from ..layers.output_gate import AttentionOutputGate

    return isinstance(module, AttentionOutputGate) or any(
        cls.__name__ == AttentionOutputGate.__name__ for cls in type(module).__mro__
    )


def output_gate_parameter_ids(model: torch.nn.Module) -> set[int]:
    """``id`` of every parameter that belongs to an attention output gate module (decided by the module, not by the
    parameter's name: the linear-attention layers' ``output_gate_proj`` is not one)."""
    return {id(p) for module in model.modules() if _is_attention_output_gate(module) for p in module.parameters()}


def build_param_groups(model: torch.nn.Module, learning_rate: float, weight_decay: float, gate_lr_scale: float,
                       decay_names: Iterable[str] | None = None, multiplier_lr_scale: float = 1.0) -> list[dict]:
    """Optimizer groups: the attention output gates' parameters (see :func:`output_gate_parameter_ids`) at
    ``learning_rate × gate_lr_scale``; the Flux Lagrange multipliers
    at ``learning_rate × multiplier_lr_scale`` and never decayed; weight decay only on ``decay_names`` (default:
    parameters with ≥ 2 dims). Frozen parameters are left out; empty groups dropped."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = set(decay_names) if decay_names is not None else {n for n, p in named if p.ndim >= 2}
    multipliers = [p for n, p in named if MULTIPLIER_PATTERN in n]
    named = [(n, p) for n, p in named if MULTIPLIER_PATTERN not in n]
    gate_ids = output_gate_parameter_ids(model)
    groups = []
    for is_gate in (False, True):
        for use_decay in (True, False):
            params = [p for n, p in named if (id(p) in gate_ids) == is_gate and (n in decay) == use_decay]
            if params:
                groups.append({
                    "params": params,
                    "lr": learning_rate * (gate_lr_scale if is_gate else 1.0),
                    "weight_decay": weight_decay if use_decay else 0.0,
                    "name": f"{'output_gate' if is_gate else 'base'}{'' if use_decay else '_no_decay'}",
                })
    if multipliers:
        groups.append({"params": multipliers, "lr": learning_rate * multiplier_lr_scale, "weight_decay": 0.0,
                       "name": "lagrange_multipliers"})
    if not groups:
        raise ValueError("no trainable parameters: nothing for the optimizer to update")
    return groups


class RecipeTrainer(SequenceParallelMixin, Trainer):
    """Trainer whose optimizer scales the output-gate learning rate, and whose loss follows the recipe's objective
    (next-token, attention transfer, or next-token plus distillation; see :mod:`.objectives`); with
    ``training.sequence_parallel_size`` > 1, every batch is split along the sequence over the processes (LASP-2)."""

    def __init__(self, *args, gate_lr_scale: float = 1.0, objective: str = "lm", teacher=None,
                 distill=None, multiplier_lr_scale: float = 1.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.gate_lr_scale = gate_lr_scale
        self.multiplier_lr_scale = multiplier_lr_scale
        self.objective = objective
        self.teacher = teacher
        self.distill = distill

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.objective in ("attention_transfer", "gate_distillation"):
            objective = attention_transfer_loss if self.objective == "attention_transfer" else gate_distillation_loss
            loss = objective(model, inputs)
            return (loss, {}) if return_outputs else loss
        if self.teacher is None:
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        outputs = model(**inputs)
        regularizer = training_regularizer(outputs)  # MoE aux / Flux Lagrangian: never reweighted
        teacher_logits = self.teacher.logits(model, inputs)
        kl = distillation_loss(outputs.logits, teacher_logits, inputs["labels"], self.distill.temperature)
        loss = self.distill.lm_weight * (outputs.loss - regularizer) + self.distill.kl_weight * kl + regularizer
        return (loss, outputs) if return_outputs else loss

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            opt_model = self.model if model is None else model
            groups = build_param_groups(
                opt_model, self.args.learning_rate, self.args.weight_decay, self.gate_lr_scale,
                decay_names=self.get_decay_parameter_names(opt_model), multiplier_lr_scale=self.multiplier_lr_scale,
            )
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
            optimizer_kwargs = {k: v for k, v in optimizer_kwargs.items() if k not in ("params", "model")}
            self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer


# --------------------------------------------------------------------------------------------------- model + modes


def _is_hf_arch(model) -> bool:
    from ..registry import VARIANTS

    return any(v.model_type == model.config.model_type for v in VARIANTS.values())


def _new_parameter_set(model) -> set[str]:
    """Names of the parameters a conversion added (empty for models that are not hf_arch variants)."""
    from ..peft_utils import new_parameter_names

    return set(new_parameter_names(model)) if _is_hf_arch(model) else set()


def apply_mode(model, recipe: Recipe):
    """Freeze / wrap ``model`` for ``training.mode``; returns the model to train (a PeftModel in lora mode)."""
    mode = recipe.training.mode
    if mode == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    if mode == "new_params":
        names = _new_parameter_set(model)
        if not names:
            raise ValueError(
                f"training.mode new_params: model {recipe.model} ({model.config.model_type}) has no new parameters "
                "to train (it is not an hf_arch variant with added parameters, e.g. a plain Llama); convert it first "
                "(hf-arch convert --to gated_attention) or use mode full / lora"
            )
        for n, p in model.named_parameters():
            p.requires_grad_(n in names)
        return model
    if mode == "patterns":
        patterns = [re.compile(p) for p in recipe.training.trainable_patterns]
        names = {n for n, _ in model.named_parameters() if any(p.search(n) for p in patterns)}
        if not names:
            raise ValueError(f"training.trainable_patterns {recipe.training.trainable_patterns} match no parameter "
                             f"of {recipe.model}")
        for n, p in model.named_parameters():
            p.requires_grad_(n in names)
        return model
    if mode == "lora":
        from peft import LoraConfig, get_peft_model

        from ..peft_utils import lora_target_modules, lora_target_parameters

        targets = recipe.lora.target_modules
        target_parameters = None
        if targets is None and _is_hf_arch(model):
            targets = lora_target_modules(model)
            # MoE experts are 3-D parameters, not nn.Linear: peft reaches them through target_parameters.
            target_parameters = lora_target_parameters(model) or None
        config = LoraConfig(
            r=recipe.lora.r, lora_alpha=recipe.lora.alpha, lora_dropout=recipe.lora.dropout,
            target_modules=targets, target_parameters=target_parameters, task_type="CAUSAL_LM",
        )
        added = []
        if recipe.lora.train_new_params:
            names = _new_parameter_set(model)
            if not names:
                raise ValueError(f"lora.train_new_params: {recipe.model} ({model.config.model_type}) has no new "
                                 "parameters (only converted hf_arch variants do)")
            added = [p for n, p in model.named_parameters() if n in names]
        try:
            peft_model = get_peft_model(model, config)
        except ValueError as err:
            raise ValueError(f"lora: could not apply LoRA to {recipe.model}: {err} (set lora.target_modules)") from err
        for p in added:  # the same tensors, now inside the PeftModel; merged saves carry their trained values
            p.requires_grad_(True)
        return peft_model
    raise ValueError(f"unknown training.mode {mode!r}")


def count_parameters(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


# --------------------------------------------------------------------------------------------------- output dir


def _has_checkpoints(out: Path) -> bool:
    return out.is_dir() and get_last_checkpoint(str(out)) is not None


def _prepare_output_dir(out: Path, resume: bool, overwrite: bool, is_main: bool) -> str | None:
    """Checks (all ranks) and cleanup (main rank); returns the checkpoint to resume from."""
    final = out / FINAL_DIR
    if resume:
        if not _has_checkpoints(out):
            raise FileNotFoundError(
                f"--resume: no checkpoint-N folder in {out} to resume from (checkpoints are written every "
                "training.save_steps steps); run without --resume to start fresh"
            )
        return get_last_checkpoint(str(out))
    if final.exists() or _has_checkpoints(out):
        if not overwrite:
            what = "a final model (final/)" if final.exists() else "checkpoints"
            raise OutputDirExistsError(
                f"output_dir {out} already holds {what}; pass --resume to continue from the last checkpoint, "
                "--overwrite to replace it, or choose another output_dir"
            )
        if is_main:
            for child in out.iterdir():
                if child.name in (FINAL_DIR, PARTIAL_DIR) or (child.is_dir() and child.name.startswith("checkpoint-")):
                    shutil.rmtree(child)
    return None


# --------------------------------------------------------------------------------------------------- main entry


def run_recipe(recipe: str | os.PathLike | Recipe | dict, overrides: Iterable[str] = (), resume: bool = False,
               overwrite: bool = False, callbacks: Iterable[TrainerCallback] = ()) -> dict:
    """Run a training recipe; returns a summary dict (see module docstring for what is written)."""
    from .. import __version__ as hf_arch_version  # noqa: F401  (importing hf_arch registers the variants)

    recipe = load_recipe(recipe, list(overrides))
    t = recipe.training
    out = Path(recipe.output_dir)
    model_dir = Path(recipe.model)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{recipe.source}: model {model_dir} is not a checkpoint dir (no config.json)")

    args = recipe.training  # transformers' TrainingArguments, parsed from the recipe's training section
    is_main = args.process_index == 0
    resume_from = _prepare_output_dir(out, resume, overwrite, is_main)
    args.distributed_state.wait_for_everyone()

    transformers.set_seed(t.seed)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    if tokenizer.pad_token_id is None:  # stories260K: no pad token, use unk (0)
        tokenizer.pad_token = tokenizer.unk_token if tokenizer.unk_token is not None else tokenizer.eos_token
    with args.main_process_first(desc="building the datasets"):
        train_ds, eval_ds = build_datasets(recipe.data, tokenizer)

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    gate_lr_scale = float(getattr(model.config, "attn_output_gate_lr_scale", 1.0) or 1.0)
    model = apply_mode(model, recipe)
    if t.gradient_checkpointing and t.mode != "full" and hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
    trainable, total = count_parameters(model)
    teacher = DistillationTeacher(recipe.distill.teacher, model, recipe.distill.temperature) \
        if recipe.distill.teacher else None
    routing_callbacks = [RoutingStatsCallback()] if has_moe_layers(model) else []
    budget = TimeBudgetCallback(t.max_train_minutes, t.budget_clock) if t.max_train_minutes is not None else None

    trainer = RecipeTrainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        data_collator=PadCollator(tokenizer.pad_token_id),
        processing_class=tokenizer,
        callbacks=[NanLossCallback(t.learning_rate), *routing_callbacks, *([budget] if budget else []), *callbacks],
        gate_lr_scale=gate_lr_scale,
        multiplier_lr_scale=float(getattr(model.config, "sparse_attn_lagrangian_lr_scale", 1.0) or 1.0),
        objective=t.objective,
        teacher=teacher,
        distill=recipe.distill,
    )
    started, cpu_started = time.time(), time.process_time()
    result = trainer.train(resume_from_checkpoint=resume_from)
    train_seconds, train_cpu_seconds = time.time() - started, time.process_time() - cpu_started
    eval_loss = None
    if eval_ds is not None:
        eval_loss = trainer.evaluate().get("eval_loss")

    curve = [(h["step"], h["loss"]) for h in trainer.state.log_history if "loss" in h and "step" in h]
    summary = {
        "output_dir": str(out),
        "final_dir": str(out / FINAL_DIR),
        "steps": trainer.state.global_step,
        "loss_start": curve[0][1] if curve else None,
        "loss_end": curve[-1][1] if curve else None,
        "train_loss": result.training_loss,
        "eval_loss": eval_loss,
        "trainable_parameters": trainable,
        "total_parameters": total,
        "mode": t.mode,
        "objective": t.objective,
        "distill_teacher": recipe.distill.teacher,
        "resumed_from": resume_from,
        "train_seconds": round(train_seconds, 2),
        "train_cpu_seconds": round(train_cpu_seconds, 2),
        "stopped_by_time_budget_at_step": budget.stopped_at_step if budget else None,
        "train_blocks": len(train_ds),
        "world_size": args.world_size,
        "loss_curve": curve,
    }

    trainer.accelerator.wait_for_everyone()
    if trainer.is_world_process_zero():
        _save_final(trainer, tokenizer, recipe, summary, model_dir, out)
    trainer.accelerator.wait_for_everyone()
    return summary


def _save_final(trainer: Trainer, tokenizer, recipe: Recipe, summary: dict, model_dir: Path, out: Path) -> None:
    """Write final/ atomically: everything goes to .final.partial/, renamed when complete."""
    partial, final = out / PARTIAL_DIR, out / FINAL_DIR
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    model = trainer.accelerator.unwrap_model(trainer.model)
    adapter_only = False
    if recipe.training.mode == "lora":
        if recipe.lora.merge_on_save:
            model = model.merge_and_unload()
        else:
            adapter_only = True
    model.save_pretrained(str(partial))  # an hf-arch model's save writes the flat remote-code files and auto_map too
    tokenizer.save_pretrained(str(partial))
    conversion = model_dir / CONVERSION_JSON
    if conversion.is_file():
        shutil.copy2(conversion, partial / CONVERSION_JSON)
    record = {
        "recipe": recipe.to_dict(),
        "recipe_file": recipe.source,
        "summary": {k: v for k, v in summary.items() if k != "loss_curve"},
        "adapter_only": adapter_only,
        "log_history": trainer.state.log_history,
        "loss_curve": [{"step": s, "loss": v} for s, v in summary["loss_curve"]],
        "data_files": {"train_file": recipe.data.train_file, "eval_file": recipe.data.eval_file},
        "versions": _versions(),
    }
    (partial / TRAINING_JSON).write_text(json.dumps(record, indent=2, default=str) + "\n", encoding="utf-8")
    _plot_loss(summary["loss_curve"], partial / "loss.png")
    replace_dir(partial, final)


def _versions() -> dict:
    import accelerate
    import datasets

    from .. import __version__

    versions = {"hf_arch": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
                "datasets": datasets.__version__, "accelerate": accelerate.__version__}
    try:
        import peft

        versions["peft"] = peft.__version__
    except ImportError:  # pragma: no cover
        versions["peft"] = None
    return versions


def _plot_loss(curve: list, path: Path) -> bool:
    """Save a loss plot when matplotlib is importable; skip silently otherwise."""
    if not curve:
        return False
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([s for s, _ in curve], [v for _, v in curve], marker=".")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True
