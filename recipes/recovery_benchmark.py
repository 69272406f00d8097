"""Recovery of converted checkpoints: convert a source, run the recovery stages, evaluate after each, plot.

    hf-arch bench recovery SRC --out DIR [--methods liger lolcats moe_half ...] [--minutes M | --stage1-steps N
        --stage2-steps N] [--text-file F --document-separator SEP | --train-file F --eval-file F] [--json]

For every method: the source, the converted model before training, after stage 1 and after stage 2 are scored on the
evaluation text's perplexity (first ``--eval-tokens`` tokens; default WikiText-2 test) and, unless
``--eval-limit 0``, zero-shot PIQA / ARC-Easy / WinoGrande accuracy (acc_norm, ``--eval-limit`` items each, the full
sets by default, with standard errors). Linearized methods also report each linear layer's attention-output MSE
against its softmax source before and after stage 1.

In-domain runs: ``--text-file F`` splits one file into training text and a held-out tail (``--holdout-fraction``,
whole documents), e.g. stories260K on ``tinystories_2mib.txt`` (``--document-separator '<|endoftext|>'``).

Budgets: ``--minutes M`` gives every stage ``M`` minutes of training, counted in this process's CPU time
(``--budget-clock cpu``, the default: methods run side by side on a shared machine get equal budgets; with
``OMP_NUM_THREADS=1`` a CPU-minute is a core-minute) or wall-clock time (``--budget-clock wall``): a short pilot
measures the stage's step time, the stage then runs the steps that fit (its LR schedule spans exactly them) with a
time guard; or fixed ``--stage1-steps`` / ``--stage2-steps``. Every point records its tokens and training seconds.

Stages (``RECIPE_DEFAULTS``; a method spec ``name:key=value,...`` changes any field):
- linearization: stage 1 attention transfer (new parameters only; skipped for Liger, which adds none), stage 2
  every weight fine-tuned with next-token loss plus distillation from the source (``stage2_mode=lora`` for LoRA,
  as the anchors' settings ``lolcats_paper`` / ``liger_paper`` / ``lizard_paper`` do);
- ``source_ft``: the source unconverted, trained by the linearizations' stage 2 for the same budget: the fair bar
  (beating the raw source may be adaptation to the training text; beating this row is not);
- MoE partition / upcycling: stage 1 router-only warm-up, stage 2 routers + experts, both distilled from the dense
  source (partitions first fit their routers at conversion, on ``--calibration-file``, default the training text).

Writes ``recovery.json`` after every method (atomically; a rerun without ``--overwrite`` resumes after the methods
it holds, if its settings match; a method interrupted mid-way resumes after its last finished stage) and ``recovery.png`` (perplexity ratio against training tokens and against
training minutes); each stage's checkpoints live under ``DIR/<method>/``.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from transformers import TrainerCallback

from ..atomic_io import atomic_write_text

LORA_ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class RecoveryMethod:
    """One row of the table: the conversion (target and options) and how its stages train (``recipe``: overrides of
    ``RECIPE_DEFAULTS``)."""

    target: str
    conversion: dict
    recipe: dict = field(default_factory=dict)
    about: str = ""  # where the settings come from (recorded in the row)

    @property
    def kind(self) -> str:
        """``moe`` for refactorized methods (MoE and ACM: gates first, then the FFN pieces), ``linear`` for
        linearizations and the unconverted source (the key of ``RECIPE_DEFAULTS``)."""
        return "moe" if self.target in ("moe", "acm") else "linear"


# What routes first in a refactorized model's stage 1: per-layer routers, Read-ME's pre-gate, ACM's learner gates.
ROUTING_PATTERNS = (r"\.router\.", r"\.pre_gate\.", r"\.mlp\.gate_(weight|bias)$")
SOURCE_TARGET = "source"  # a method's target that keeps the source unconverted (the fine-tuned-source bar)


# How stages train unless a method (or a ``name:key=value`` spec) says otherwise. Linearized models: stage 2
# fine-tunes every weight with distillation from the source, the best of the stories260K ablation
# (recipes/results/stories260k_recipe_ablation.md: LoRA r8 on q,k,v,o 1.069x, + distillation 1.077x, LoRA on every
# projection 1.070x, full 1.080x, full + distillation 1.056x for LoLCATs; 1.295x → 1.145x for Gated DeltaNet).
# The LoRA fields apply with stage2_mode lora (the anchors' settings, and models too large to fine-tune fully).
RECIPE_DEFAULTS = {
    "linear": {"stage1": True, "stage1_lr": 1e-2, "stage2_mode": "full", "stage2_lr": 1e-3, "lora_r": 8,
               "lora_alpha": 16, "lora_targets": ("q_proj", "k_proj", "v_proj", "o_proj"), "train_new": False,
               "distill": True},
    # stage2_mode experts: routers + experts (+ shared expert) train; full: every weight. frozen_routing: routing
    # (routers, pre-gate, ACM gates) never trains, stage 1 is skipped and its minutes go to stage 2.
    "moe": {"stage1_lr": 1e-3, "stage2_lr": None, "stage2_mode": "experts",  # stage2_lr None: MOE_STAGE2_LR
            "frozen_routing": False},
}
METHODS = {
    "liger": RecoveryMethod("gla", {"method": "liger"}),
    "liger_keep": RecoveryMethod("gla", {"method": "liger", "ratio": 3}),
    "lolcats": RecoveryMethod("gla", {"method": "lolcats"}),
    "lolcats_keep": RecoveryMethod("gla", {"method": "lolcats", "ratio": 3}),
    "lizard": RecoveryMethod("gla", {"method": "lizard"}),
    "still": RecoveryMethod("gla", {"method": "still"}),
    "still_keep": RecoveryMethod("gla", {"method": "still", "ratio": 3}),
    "mamba_init": RecoveryMethod("gated_deltanet", {"method": "mamba_init"}),
    "kda": RecoveryMethod("kda", {"method": "mamba_init"}),
    "moe_half": RecoveryMethod("moe", {"method": "partition", "experts": 8, "top_k": 4}),
    "moe_quarter": RecoveryMethod("moe", {"method": "partition", "experts": 8, "top_k": 2}),
    "read_me_half": RecoveryMethod("moe", {"method": "read_me", "experts": 8, "top_k": 4}),
    # Distillation alone would open every ACM gate (nothing in the loss prices compute): the gates keep the
    # conversion's distilled counts and the learners recover.
    "acm": RecoveryMethod("acm", {"learners": 4}, {"frozen_routing": True},
                          "ACM: gates frozen at the conversion's distilled learner counts; learners trained"),
    # ACM's own recipe: the gates keep training, and a compute price (β × the expected share of learners run) in the
    # loss stops them from opening every learner; β trades perplexity for learners.
    "acm_priced": RecoveryMethod("acm", {"learners": 4, "compute_loss_weight": 0.1}, {},
                                 "ACM: gates and learners trained with KL to the source plus a compute price β = 0.1"),
    "moe_upcycle": RecoveryMethod("moe", {"method": "upcycle", "experts": 4, "top_k": 2, "router_std": 0.02}),
    # The bar for every row: the source itself, trained by the linearizations' stage-2 recipe for the same budget. A
    # row that beats the source may only have adapted to the training text; beating this one is recovery.
    "source_ft": RecoveryMethod(SOURCE_TARGET, {}, {"stage1": False},
                                "the unconverted source fine-tuned with the linearizations' stage-2 recipe"),
    # The anchors' published settings (shared/reference/peers-conversion.md), stage lengths scaled to the budget:
    "lolcats_paper": RecoveryMethod(
        "gla", {"method": "lolcats", "window": 64, "mix_weights": [1.0, 0.1]},
        {"stage1_lr": 1e-2, "stage2_mode": "lora", "stage2_lr": 1e-4, "lora_r": 8, "lora_alpha": 16,
         "lora_targets": ("q_proj", "k_proj", "v_proj", "o_proj"), "distill": False},
        "LoLCATs: attention transfer lr 1e-2, then LoRA r8/α16 on q,k,v,o at lr 1e-4, window 64, γ₀ 0.1"),
    "liger_paper": RecoveryMethod(
        "gla", {"method": "liger", "window": 64},
        {"stage2_mode": "lora", "stage2_lr": 1e-3, "lora_r": 8, "lora_alpha": 8,
         "lora_targets": ("q_proj", "k_proj", "v_proj"), "distill": False},
        "Liger: one stage, LoRA r8/α8 on q,k,v at lr 1e-3, window 64, 0.5/0.5 mixing"),
    "lizard_paper": RecoveryMethod(
        "gla", {"method": "lizard", "window": 128},
        {"stage1_lr": 1e-3, "stage2_mode": "lora", "stage2_lr": 5e-4, "lora_r": 8, "lora_alpha": 16,
         "lora_targets": ("q_proj", "k_proj", "v_proj"), "distill": False},
        "Lizard: attention transfer lr 1e-3, then LoRA r8/α16 on q,k,v at lr 5e-4, window 128"),
}
TASK_FILES = ("piqa_valid.jsonl", "arc_easy_test.jsonl", "winogrande_dev.jsonl")
PILOT_STEPS = 6
# MoE end-to-end stage: the best of 2e-4 / 1e-3 / 3e-3 / 1e-2 on stories260K in domain (recipes/results ablation).
MOE_STAGE2_LR = 3e-3
# Settings a resumed run must share with the results it extends.
RESUME_KEYS = ("source", "train_file", "eval_file", "eval_tokens", "eval_limit", "minutes", "stage1_steps",
               "stage2_steps", "stage1_lr", "stage2_lr", "batch_size", "block_size", "distill", "calibration_file",
               "generation_prompts", "generation_tokens", "generation_prompt_tokens", "task_points", "compile")
# Settings added after results were first written: what those results ran with.
RESUME_DEFAULTS = {"task_points": "all", "generation_prompt_tokens": 32, "compile": False}


def _assets() -> Path:
    """``$HF_ARCH_ASSETS``, else ``../shared/assets`` seen from the working directory (as the recipes resolve it)."""
    from .schema import DEFAULT_ENV

    return Path(os.environ.get("HF_ARCH_ASSETS", DEFAULT_ENV["HF_ARCH_ASSETS"])).resolve()


def split_text_file(path: Path, out: Path, separator: str | None, holdout: float) -> tuple[Path, Path]:
    """Whole documents of ``path`` (separated by ``separator`` lines, else blank lines): the first ``1 − holdout``
    of them → ``out/train.txt``, the rest → ``out/eval.txt``, one blank line between documents."""
    text = Path(path).read_text(encoding="utf-8")
    parts = text.split(separator) if separator else text.split("\n\n")
    documents = [d.strip() for d in parts if d.strip()]
    if not 0 < holdout < 1:
        raise SystemExit(f"--holdout-fraction must be in (0, 1), got {holdout}")
    held = max(1, round(len(documents) * holdout))
    if len(documents) - held < 1:
        raise SystemExit(f"{path}: {len(documents)} document(s); cannot hold out {holdout:.0%} and train on the rest "
                         "(is --document-separator right?)")
    out.mkdir(parents=True, exist_ok=True)
    train, evaluation = out / "train.txt", out / "eval.txt"
    atomic_write_text(train, "\n\n".join(documents[:-held]) + "\n")
    atomic_write_text(evaluation, "\n\n".join(documents[-held:]) + "\n")
    return train, evaluation


def _context_length(model) -> int:
    return min(1024, model.config.max_position_embeddings)


def check_eval_text(source: str, eval_file: Path, eval_tokens: int) -> int:
    """Refuse, before any training, an evaluation text shorter than one scoring window; returns its token count."""
    from transformers import AutoConfig, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source)
    context = min(1024, AutoConfig.from_pretrained(source).max_position_embeddings)
    n = len(tokenizer(Path(eval_file).read_text(encoding="utf-8"), verbose=False)["input_ids"])
    usable = min(n, eval_tokens)
    if usable < context + 1:
        raise SystemExit(f"--eval-file {eval_file}: {n} tokens (using {usable} with --eval-tokens {eval_tokens}); one "
                         f"scoring window of the source needs {context + 1}")
    return n


class _ACMLearners:
    """Forward hooks on a model's ACM layers summing the learners each token ran (their ``last_learners`` × tokens);
    ``report()`` gives the mean per layer and over layers and their share of the FFN, or nothing without ACM."""

    def __init__(self, model) -> None:
        from ..layers.acm import AdaptiveComputationModule

        self.layers = [m for m in model.modules() if isinstance(m, AdaptiveComputationModule)]
        self.sums, self.tokens, self.handles = [0.0] * len(self.layers), [0] * len(self.layers), []

    def __enter__(self):
        for index, layer in enumerate(self.layers):
            def count(module, inputs, output, index=index):
                tokens = inputs[0].shape[:-1].numel()
                if module.last_learners is not None and tokens:
                    self.sums[index] += module.last_learners * tokens
                    self.tokens[index] += tokens
            self.handles.append(layer.register_forward_hook(count))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()

    def report(self) -> dict:
        if not self.layers or not all(self.tokens):
            return {}
        per_layer = [round(total / n, 3) for total, n in zip(self.sums, self.tokens)]
        mean = sum(per_layer) / len(per_layer)
        return {"acm_learners_per_token": round(mean, 3), "acm_learners_per_layer": per_layer,
                "acm_ffn_share": round(mean / self.layers[0].num_learners, 4)}


def evaluate_model(model_dir: Path, args, assets: Path, batch_size: int = 8, tasks: bool = True) -> dict:
    """Perplexity on the evaluation text, the zero-shot tasks (unless ``--eval-limit 0`` or not ``tasks``) and the
    generation agreement with the source."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .evaluation import multiple_choice, perplexity

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    started = time.time()
    with _ACMLearners(model) as learners:  # ACM models: how many learners the perplexity tokens ran
        ppl = perplexity(model, tokenizer, args.eval_file, context_length=_context_length(model),
                         max_tokens=args.eval_tokens, batch_size=batch_size, show_progress=False)
    point = {"ppl": round(ppl["ppl"], 4), "eval_tokens_scored": ppl["tokens"], **learners.report()}
    if args.eval_limit != 0 and tasks:
        scores = {}
        for name in TASK_FILES:
            result = multiple_choice(model, tokenizer, assets / "data" / name, limit=args.eval_limit,
                                     batch_size=batch_size, show_progress=False)
            scores[Path(name).stem] = {"acc_norm": round(result["acc_norm"], 4),
                                       "stderr": round(result["acc_norm_stderr"], 4), "items": result["n"]}
        point["tasks"] = scores
        point["avg_acc"] = round(sum(t["acc_norm"] for t in scores.values()) / len(scores), 4)
    reference = getattr(args, "generation_reference", None)
    if reference:
        from .generation_check import agreement, greedy_continuations

        continuations = greedy_continuations(model, tokenizer, reference["prompts"], args.generation_tokens,
                                             show_progress=False)
        point["generation"] = agreement(reference["continuations"], continuations)
    point["eval_seconds"] = round(time.time() - started)
    return point


def generation_reference(args, out: Path) -> dict | None:
    """The source's greedy continuations of ``--generation-prompts`` held-out prompts (cached in
    ``out/generation_reference.json``), against which every point's generation agreement is measured."""
    if not args.generation_prompts:
        return None
    path = out / "generation_reference.json"
    settings = {"source": args.source, "eval_file": str(args.eval_file), "prompts": args.generation_prompts,
                "new_tokens": args.generation_tokens, "prompt_tokens": args.generation_prompt_tokens}
    with _locked(out):
        if path.exists():
            cached = json.loads(path.read_text(encoding="utf-8"))
            if cached.get("settings") == settings:
                return cached
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from .generation_check import greedy_continuations, held_out_prompts

        tokenizer = AutoTokenizer.from_pretrained(args.source)
        try:
            prompts = held_out_prompts(args.eval_file, tokenizer, args.generation_prompts,
                                       prompt_tokens=args.generation_prompt_tokens)
        except ValueError as err:
            raise SystemExit(f"--generation-prompts: {err}") from None
        model = AutoModelForCausalLM.from_pretrained(args.source, dtype=torch.float32).eval()
        reference = {"settings": settings, "prompts": prompts,
                     "continuations": greedy_continuations(model, tokenizer, prompts, args.generation_tokens)}
        atomic_write_text(path, json.dumps(reference) + "\n")
    return reference


def attention_mse(model_dir: Path, eval_file: Path, tokens: int = 1024) -> list[float] | None:
    """Per linear layer MSE against the softmax source on the first tokens of the evaluation text."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..conversion.linearize import attention_mse_per_layer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    text = Path(eval_file).read_text(encoding="utf-8")[: tokens * 8]
    length = min(tokens, _context_length(model))
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :length]
    return [round(v, 6) for v in attention_mse_per_layer(model, ids)]


def _parse_value(text: str):
    if "+" in text:
        return [_parse_value(part) for part in text.split("+")]
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def resolve_method(spec: str) -> RecoveryMethod:
    """``name`` (a key of ``METHODS``) or ``name:key=value,...`` with conversion options or recipe fields changed
    (list values joined by ``+``), e.g. ``lolcats:window=128,lora_targets=all,stage2_lr=3e-3``."""
    from ..conversion.api import CONVERSIONS

    name, _, changes = spec.partition(":")
    if name not in METHODS:
        raise SystemExit(f"--methods {spec!r}: unknown method {name!r}; known: {', '.join(sorted(METHODS))}")
    method = METHODS[name]
    kind = method.kind
    option_fields = [] if method.target == SOURCE_TARGET else \
        sorted(set(CONVERSIONS[method.target].options_class.__dataclass_fields__) - {"method"})
    conversion, recipe = dict(method.conversion), dict(method.recipe)
    for item in filter(None, changes.split(",")):
        key, eq, text = item.partition("=")
        if not eq or not text:
            raise SystemExit(f"--methods {spec!r}: {item!r} is not key=value")
        value = _parse_value(text)
        if key in RECIPE_DEFAULTS[kind]:
            recipe[key] = value
        elif key in option_fields:
            conversion[key] = value
        else:
            raise SystemExit(f"--methods {spec!r}: {key!r} is neither a recipe field ({', '.join(RECIPE_DEFAULTS[kind])}) "
                             f"nor an option of --to {method.target} ({', '.join(option_fields)})")
    settings = recipe_settings(kind, recipe)
    modes = ("lora", "full") if kind == "linear" else ("experts", "full")
    if settings["stage2_mode"] not in modes:
        raise SystemExit(f"--methods {spec!r}: stage2_mode must be one of {modes}, got {settings['stage2_mode']!r}")
    if kind == "linear":
        lora_only = sorted(k for k in recipe if k.startswith("lora_") or k == "train_new")
        if lora_only and settings["stage2_mode"] != "lora":
            raise SystemExit(f"--methods {spec!r}: {', '.join(lora_only)} apply to stage2_mode=lora (this method's "
                             f"stage 2 is {settings['stage2_mode']!r})")
        unknown = sorted(set(settings["lora_targets"]) - set(LORA_ALL))
        if unknown:
            raise SystemExit(f"--methods {spec!r}: lora_targets {unknown} are not among {', '.join(LORA_ALL)} (or all)")
    return replace(method, conversion=conversion, recipe=recipe)


def recipe_settings(kind: str, recipe: dict) -> dict:
    """``RECIPE_DEFAULTS[kind]`` with a method's overrides (``lora_targets`` "all" → every projection)."""
    settings = {**RECIPE_DEFAULTS[kind], **recipe}
    if "lora_targets" in settings:
        targets = settings["lora_targets"]
        targets = [targets] if isinstance(targets, str) else list(targets)
        settings["lora_targets"] = list(LORA_ALL) if targets == ["all"] else targets
    return settings


def stage_recipes(kind: str, source: str, args, method: RecoveryMethod | None = None) -> list[tuple[str, dict]]:
    """``[(stage, recipe sections)]`` for a linearized (``linear``) or refactorized (``moe``) model: the method's
    recipe settings, then ``--stage1-lr`` / ``--stage2-lr`` / ``--distill`` where given (they apply to every
    method)."""
    settings = recipe_settings(kind, method.recipe if method else {})
    for key in ("stage1_lr", "stage2_lr"):
        if getattr(args, key, None) is not None:
            settings[key] = getattr(args, key)
    base = {"per_device_train_batch_size": args.batch_size, "logging_steps": 10, "save_steps": 10**6,
            "save_total_limit": 1, "lr_scheduler_type": "cosine", "warmup_steps": 5,
            "torch_compile": bool(getattr(args, "compile", False))}
    if kind == "moe":
        distill = {"teacher": source, "kl_weight": 1.0, "lm_weight": 1.0, "temperature": 2.0}
        stage2_moe = ({"mode": "full"} if settings["stage2_mode"] == "full" else
                      {"mode": "patterns",
                       "trainable_patterns": [*([] if settings["frozen_routing"] else ROUTING_PATTERNS),
                                              r"\.experts\.", r"\.shared_expert\.", r"\.learners\."]})
        stages = [("stage2", {"training": {**base, **stage2_moe, "max_steps": args.stage2_steps,
                                           "learning_rate": settings["stage2_lr"] or MOE_STAGE2_LR},
                              "distill": distill})]
        if not settings["frozen_routing"]:
            stages.insert(0, ("stage1", {"training": {**base, "mode": "patterns",
                                                      "trainable_patterns": list(ROUTING_PATTERNS),
                                                      "max_steps": args.stage1_steps,
                                                      "learning_rate": settings["stage1_lr"]},
                                         "distill": distill}))
        return stages
    training = {**base, "mode": settings["stage2_mode"], "max_steps": args.stage2_steps,
                "learning_rate": settings["stage2_lr"]}
    stage2 = {"training": training}
    if settings["stage2_mode"] == "lora":
        stage2["lora"] = {"r": settings["lora_r"], "alpha": settings["lora_alpha"],
                          "target_modules": settings["lora_targets"], "train_new_params": settings["train_new"]}
    if settings["distill"] or getattr(args, "distill", False):
        # LoRA keeps the source weights: the model's own softmax function is the teacher; full fine-tuning changes
        # them, so the source checkpoint is loaded as the teacher.
        teacher = "self" if settings["stage2_mode"] == "lora" else source
        stage2["distill"] = {"teacher": teacher, "kl_weight": 1.0, "lm_weight": 1.0, "temperature": 2.0}
    stages = [("stage2", stage2)]
    if settings["stage1"]:
        stages.insert(0, ("stage1", {"training": {**base, "mode": "new_params", "objective": "attention_transfer",
                                                  "max_steps": args.stage1_steps,
                                                  "learning_rate": settings["stage1_lr"]}}))
    return stages


class StepClock(TrainerCallback):
    """Times steps on the budget's clock (wall or this process's CPU time): the steady-state seconds per step,
    leaving out the first (which pays for warm-up work the later ones do not)."""

    def __init__(self, clock: str = "wall"):
        from .runner import TimeBudgetCallback

        self.now = TimeBudgetCallback.CLOCKS[clock]
        self.ends: list[float] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.ends.append(self.now())

    def seconds_per_step(self) -> float:
        if len(self.ends) < 2:
            raise RuntimeError(f"the pilot ran {len(self.ends)} step(s); timing needs at least 2")
        return (self.ends[-1] - self.ends[0]) / (len(self.ends) - 1)


def _warmup(recipe: dict, steps: int) -> int:
    """The recipe's warmup, at most a tenth of the stage (none below 10 steps: the first warmup step has LR 0)."""
    return min(recipe["training"].get("warmup_steps", 0), steps // 10)


def _run_stage(recipe: dict, work: Path, stage: str, args, extra_minutes: float = 0.0) -> dict:
    """One stage: with ``--minutes`` (plus what a skipped stage left), a pilot of ``PILOT_STEPS`` steps sets how many
    steps fit the budget."""
    from .runner import run_recipe

    if args.minutes is None:
        steps = recipe["training"]["max_steps"]
        return run_recipe({**recipe, "training": {**recipe["training"], "warmup_steps": _warmup(recipe, steps)}})
    minutes = args.minutes + extra_minutes
    pilot_dir = work / f"{stage}_pilot"
    clock = StepClock(args.budget_clock)
    run_recipe({**recipe, "output_dir": str(pilot_dir),
                "training": {**recipe["training"], "max_steps": PILOT_STEPS, "warmup_steps": 0}}, callbacks=[clock])
    shutil.rmtree(pilot_dir, ignore_errors=True)
    per_step = clock.seconds_per_step()
    steps = int(minutes * 60 * 0.97 / per_step)
    if steps < 1:
        raise SystemExit(f"--minutes {args.minutes}: one {stage} step takes {per_step:.1f} s; the budget fits none")
    training = {**recipe["training"], "max_steps": steps, "max_train_minutes": minutes,
                "budget_clock": args.budget_clock,
                "warmup_steps": _warmup(recipe, steps)}
    summary = run_recipe({**recipe, "training": training})
    summary["pilot_seconds_per_step"] = round(per_step, 4)
    return summary


def _work_name(spec: str) -> str:
    """A folder name for a method spec (``lolcats:window=128`` → ``lolcats__window-128``)."""
    return spec.replace(":", "__").replace(",", "_").replace("=", "-").replace("+", "-")


def _copy_source(source: str, out: Path) -> None:
    """The source checkpoint as the starting point of a method that converts nothing (fp32, as conversions write)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(source).save_pretrained(out)


PROGRESS_FILE = "progress.json"


def _load_progress(work: Path, args) -> dict | None:
    """What an interrupted run of this method finished (conversion, stages), if it ran with these settings."""
    path = work / PROGRESS_FILE
    if not path.exists():
        return None
    progress = json.loads(path.read_text(encoding="utf-8"))
    if progress.get("settings") != _settings(args):
        changed = sorted(k for k in set(progress.get("settings", {})) | set(_settings(args))
                         if progress.get("settings", {}).get(k) != _settings(args).get(k))
        print(f"{work.name}: earlier partial run had other settings ({', '.join(changed)}); starting it afresh")
        return None
    return progress


def _save_progress(work: Path, args, state: dict) -> None:
    atomic_write_text(work / PROGRESS_FILE, json.dumps({"settings": _settings(args), **state}, indent=1) + "\n")


def _finished_training(stage_dir: Path, started_from: Path) -> dict | None:
    """The summary of a stage whose training completed (``final/`` is renamed into place only when whole) from
    ``started_from``, or None: an interruption during the (long) evaluation then costs no retraining."""
    from .runner import FINAL_DIR, TRAINING_JSON

    record_path = stage_dir / FINAL_DIR / TRAINING_JSON
    if not record_path.is_file():
        return None
    record = json.loads(record_path.read_text(encoding="utf-8"))
    if record.get("recipe", {}).get("model") != str(started_from):
        return None
    return {**record["summary"], "loss_curve": [(p["step"], p["loss"]) for p in record.get("loss_curve", [])]}


def run_method(name: str, source: str, out: Path, args, assets: Path) -> dict:
    """Convert, run the stages and evaluate after each. An interrupted method resumes after its last finished stage
    (``DIR/<method>/progress.json``, written after the conversion and after every stage), if the settings match."""
    from transformers import AutoModelForCausalLM

    from ..conversion import convert
    from ..peft_utils import new_parameter_names

    method = resolve_method(name)
    to, options = method.target, method.conversion
    work = out / _work_name(name)
    progress = _load_progress(work, args)
    started = time.time()
    kind = method.kind
    linear = kind == "linear" and to != SOURCE_TARGET
    converted = work / "converted"
    if progress is None:
        if work.exists():
            shutil.rmtree(work)
        extra = {}
        if (to == "moe" and options["method"] in ("partition", "read_me")) or to == "acm":
            extra = {"calibration_file": args.calibration_file or args.train_file}
        if to == SOURCE_TARGET:
            _copy_source(source, converted)
            record = {"max_abs_logit_diff": 0.0}
        else:
            record = convert(source, converted, to=to, **options, **extra).record
        row = {"method": name, "target": to, "options": options, "recipe": recipe_settings(kind, method.recipe),
               **({"about": method.about} if method.about else {}),
               "max_abs_logit_diff": record["max_abs_logit_diff"],
               "conversion_seconds": round(time.time() - started),
               "points": [{"stage": "converted", "tokens": 0, "train_seconds": 0.0, "train_cpu_seconds": 0.0,
                           **evaluate_model(converted, args, assets, tasks=args.task_points == "all")}]}
        if "report" in record:
            row["conversion_report"] = record["report"]
        if linear:
            row["attention_mse_before"] = attention_mse(converted, args.eval_file)
        if args.minutes is not None:
            row["budget_clock"] = args.budget_clock
        progress = {"row": row, "stages_done": 0, "current": str(converted), "tokens": 0, "seconds": 0.0,
                    "cpu_seconds": 0.0, "carried": 0.0, "elapsed": time.time() - started}
        _save_progress(work, args, progress)
    else:
        print(f"{name}: resuming after {progress['stages_done']} finished stage(s) in {work}")
        progress["row"].setdefault("resumed_after_stages", progress["stages_done"])
    row = progress["row"]
    current, tokens = Path(progress["current"]), progress["tokens"]
    seconds, cpu_seconds = progress["seconds"], progress["cpu_seconds"]
    carried = progress["carried"]  # minutes of a skipped stage, given to the next one (every method: one budget)
    elapsed_before = progress["elapsed"] - (time.time() - started)  # wall time of earlier runs of this method
    has_new = to != SOURCE_TARGET and bool(new_parameter_names(AutoModelForCausalLM.from_pretrained(converted)))
    report = row.get("conversion_report", {})
    routers_fitted = bool(report.get("router_distillation") or report.get("pre_gate_distillation"))
    stages = stage_recipes(kind, source, args, method)
    if stages[0][0] != "stage1":
        stages.insert(0, ("stage1", None))
    for index, (stage, sections) in enumerate(stages):
        if index < progress["stages_done"]:
            continue
        skip = None
        if sections is None:
            skip = ("routing frozen (frozen_routing)" if kind == "moe" else
                    "the recipe has no attention-transfer stage")
        elif stage == "stage1" and linear and not has_new:
            skip = "no new parameters"
        elif stage == "stage1" and routers_fitted:
            skip = "routers fitted at conversion (router / pre-gate distillation)"
        if skip:
            row["points"].append({**row["points"][-1], "stage": "stage1", "skipped": skip})
            carried = args.minutes or 0.0
        else:
            summary = _finished_training(work / stage, current)
            if summary is not None:  # trained before an interruption that came during its evaluation
                print(f"{name}: {stage} finished training before the interruption; evaluating it")
            else:
                for leftover in (work / stage, work / f"{stage}_pilot"):  # an interrupted stage's partial output
                    shutil.rmtree(leftover, ignore_errors=True)
                recipe = {"model": str(current), "output_dir": str(work / stage),
                          "data": {"train_file": str(args.train_file), "block_size": args.block_size}, **sections}
                summary = _run_stage(recipe, work, stage, args, extra_minutes=carried)
            carried = 0.0
            current = work / stage / "final"
            stage_tokens = summary["steps"] * args.batch_size * args.block_size
            tokens += stage_tokens
            seconds += summary["train_seconds"]
            cpu_seconds += summary["train_cpu_seconds"]
            point = {"stage": stage, "tokens": tokens, "steps": summary["steps"], "train_seconds": round(seconds, 1),
                     "train_cpu_seconds": round(cpu_seconds, 1),
                     "tokens_per_second": round(stage_tokens / max(summary["train_seconds"], 1e-9)),
                     "loss_start": summary["loss_start"], "loss_end": summary["loss_end"],
                     # the training curve between this point and the last: (tokens so far, logged loss)
                     "loss_curve": [(tokens - stage_tokens + step * args.batch_size * args.block_size, round(loss, 5))
                                    for step, loss in summary.get("loss_curve", [])],
                     **evaluate_model(current, args, assets,
                                      tasks=args.task_points == "all" or index == len(stages) - 1)}
            row["points"].append(point)
            if linear and stage == "stage1":
                row["attention_mse_after_stage1"] = attention_mse(current, args.eval_file)
        _save_progress(work, args, {"row": row, "stages_done": index + 1, "current": str(current), "tokens": tokens,
                                    "seconds": seconds, "cpu_seconds": cpu_seconds, "carried": carried,
                                    "elapsed": elapsed_before + time.time() - started})
    row["seconds"] = round(elapsed_before + time.time() - started)
    return row


def plot(rows: list[dict], source_eval: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(18, 4.5))
    for row in rows:
        ratios = [p["ppl"] / source_eval["ppl"] for p in row["points"]]
        line, = axes[0].plot([p["tokens"] for p in row["points"]], ratios, marker="o", label=row["method"])
        axes[1].plot([_train_minutes(row, p) for p in row["points"]], ratios, marker="o",
                     label=row["method"])
        curve = [pair for p in row["points"] if p.get("stage") == "stage2" for pair in p.get("loss_curve", [])]
        if curve:  # the last stage's training loss (next-token + distillation terms, as the trainer logs it)
            axes[2].plot(*zip(*curve), color=line.get_color(), label=row["method"])
    axes[2].set_xlabel("training tokens")
    axes[2].set_ylabel("stage-2 training loss")
    axes[2].grid(alpha=0.3)
    axes[1].sharey(axes[0])
    for ax, label in zip(axes[:2], ("training tokens", "training minutes (each row's budget clock)")):
        ax.axhline(1.0, color="black", linestyle="--", label="source")
        ax.set_xlabel(label)
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"perplexity / source ({Path(source_eval.get('file', 'eval')).name})")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _train_minutes(row: dict, point: dict) -> float:
    """Training minutes up to ``point`` on the clock that budgeted the row (CPU time, or wall time for old rows)."""
    key = "train_cpu_seconds" if row.get("budget_clock") == "cpu" else "train_seconds"
    return point.get(key, 0.0) / 60


def format_table(result: dict) -> str:
    source = result["source_eval"]
    tasks = list(source.get("tasks", {}))
    generation = any("generation" in p for row in result["methods"] for p in row["points"])
    task_cells = lambda point: [f"{point['tasks'][t]['acc_norm']} ± {point['tasks'][t]['stderr']}"  # noqa: E731
                                if t in point.get("tasks", {}) else "-" for t in tasks]
    gen_cells = lambda point: ([f"{point['generation']['token_agreement']} ± "  # noqa: E731
                                f"{point['generation']['token_agreement_stderr']}" if "generation" in point else "-"]
                               if generation else [])
    row_of = lambda cells: "| " + " | ".join(str(c) for c in cells) + " |"  # noqa: E731
    header = ["method", "stage", "tokens", "train min", "ppl", "ppl / source", *tasks]
    header += ["greedy agreement"] if generation else []
    lines = [row_of(header), row_of(["---"] * len(header))]
    lines.append(row_of(["source", "-", "-", "-", source["ppl"], "1.00", *task_cells(source)]
                        + (["1.0"] if generation else [])))
    for row in result["methods"]:
        for p in row["points"]:
            lines.append(row_of([row["method"], p["stage"], p["tokens"], f"{_train_minutes(row, p):.1f}",
                                 p["ppl"], f"{p['ppl'] / source['ppl']:.3f}", *(task_cells(p) if tasks else []),
                                 *gen_cells(p)]))
    return "\n".join(lines)


def _settings(args) -> dict:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
            if k not in ("json", "overwrite", "methods", "generation_reference", "recheck_generation", "budget_clock")}


GENERATION_KEYS = ("generation_prompts", "generation_tokens", "generation_prompt_tokens")


def _load_earlier(path: Path, args, ignore: tuple[str, ...] = ()) -> dict | None:
    """The results a rerun extends (same settings but ``ignore``), or None to start afresh; refuses mismatched
    settings by name."""
    if not path.exists():
        return None
    if args.overwrite:
        return None
    earlier = json.loads(path.read_text(encoding="utf-8"))
    refuse_other_settings(path, earlier.get("settings", {}), _settings(args),
                          [k for k in RESUME_KEYS if k not in ignore], RESUME_DEFAULTS)
    return earlier


def refuse_other_settings(path: Path, then: dict, now: dict, keys, defaults: dict | None = None) -> None:
    """A SystemExit naming every key of ``keys`` whose value differs between the results in ``path`` (``then``) and
    this run (``now``); a key missing from either reads as its ``defaults`` value (what older results ran with)."""
    defaults = defaults or {}
    value = lambda settings, k: settings.get(k, defaults.get(k))  # noqa: E731
    different = [k for k in keys if value(then, k) != value(now, k)]
    if different:
        changes = ", ".join(f"{k}: {value(then, k)!r} there, {value(now, k)!r} now" for k in different)
        raise SystemExit(f"{path} holds results with other settings ({changes}); pass --overwrite to start afresh")


@contextlib.contextmanager
def _locked(out: Path):
    """An exclusive lock on ``out`` (several benchmark processes may share one ``--out``, each taking other methods)."""
    with open(out / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def recheck_generation(result_path: Path, args) -> dict:
    """Score every point of the finished methods again with the current generation settings, from the checkpoints
    the run kept (``<method>/converted``, ``<method>/<stage>/final``), and record those settings."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .generation_check import agreement, greedy_continuations

    out = result_path.parent
    with _locked(out):
        result = _load_earlier(result_path, args, ignore=GENERATION_KEYS)
    if result is None:
        raise SystemExit(f"--recheck-generation: {result_path} holds no results to score again")
    reference = generation_reference(args, out)
    if reference is None:
        raise SystemExit("--recheck-generation needs --generation-prompts > 0")
    for row in result["methods"]:
        work = out / _work_name(row["method"])
        for point in row["points"]:
            if point.get("skipped"):  # the same model as the point before it
                point.pop("generation", None)
                continue
            model_dir = work / "converted" if point["stage"] == "converted" else work / point["stage"] / "final"
            if not (model_dir / "config.json").is_file():
                raise SystemExit(f"--recheck-generation: {model_dir} is missing; rerun {row['method']!r} instead")
            tokenizer = AutoTokenizer.from_pretrained(model_dir)
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
            continuations = greedy_continuations(model, tokenizer, reference["prompts"], args.generation_tokens,
                                                 show_progress=False)
            point["generation"] = agreement(reference["continuations"], continuations)
        for before, point in zip(row["points"], row["points"][1:]):
            if point.get("skipped"):
                point["generation"] = before["generation"]
        print(f"{row['method']}: greedy agreement " + " / ".join(
            str(p["generation"]["token_agreement"]) for p in row["points"]))
    with _locked(out):
        result["settings"].update({k: v for k, v in _settings(args).items() if k in GENERATION_KEYS})
        atomic_write_text(result_path, json.dumps(result, indent=2) + "\n")
        plot(result["methods"], result["source_eval"], out / "recovery.png")
    return result


def _merge_and_save(result_path: Path, args, row: dict | None = None, source_eval: dict | None = None) -> dict:
    """Re-read ``recovery.json`` under the lock, add ``row`` (replacing a row of the same method) and the source's
    evaluation, write it atomically with the plot, and return it."""
    with _locked(result_path.parent):
        result = _load_earlier(result_path, args) or {
            "source": args.source, "settings": _settings(args), "source_eval": None, "methods": []}
        if source_eval is not None and result["source_eval"] is None:
            result["source_eval"] = source_eval
        if row is not None:
            result["methods"] = [r for r in result["methods"] if r["method"] != row["method"]] + [row]
        atomic_write_text(result_path, json.dumps(result, indent=2) + "\n")
        if result["methods"] and result["source_eval"]:
            plot(result["methods"], result["source_eval"], result_path.parent / "recovery.png")
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="Llama-family checkpoint dir")
    parser.add_argument("--out", required=True)
    parser.add_argument("--methods", nargs="+", default=["liger", "liger_keep", "lolcats", "lolcats_keep",
                                                         "moe_half"], metavar="METHOD[:KEY=VALUE,...]",
                        help=f"methods: {', '.join(METHODS)}; each may change conversion options or recipe fields "
                             "after a colon, e.g. lolcats:window=128,lora_targets=all,stage2_mode=full "
                             "(recipe fields: " + ", ".join(RECIPE_DEFAULTS["linear"]) + ")")
    parser.add_argument("--minutes", type=float, default=None,
                        help="training minutes per stage (a pilot picks the steps); overrides the step counts")
    parser.add_argument("--budget-clock", choices=["cpu", "wall"], default="cpu",
                        help="how --minutes are counted: this process's CPU time (default: other jobs on a shared "
                             "machine take nothing from the budget; set OMP_NUM_THREADS for what a CPU-minute means) "
                             "or wall-clock time; each row records its clock")
    parser.add_argument("--stage1-steps", type=int, default=100)
    parser.add_argument("--stage2-steps", type=int, default=200)
    parser.add_argument("--stage1-lr", type=float, default=None, help="override the stage 1 recipes' learning rate")
    parser.add_argument("--stage2-lr", type=float, default=None, help="override the stage 2 recipes' learning rate")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--compile", action="store_true",
                        help="train under torch.compile (TrainingArguments.torch_compile); its compile time counts "
                             "in the budget")
    parser.add_argument("--block-size", type=int, default=512)
    parser.add_argument("--text-file", default=None,
                        help="one text to split into training text and a held-out evaluation tail (in-domain runs)")
    parser.add_argument("--document-separator", default=None, help="--text-file: the line between documents")
    parser.add_argument("--holdout-fraction", type=float, default=0.1, help="--text-file: documents held out")
    parser.add_argument("--train-file", default=None, help="default: WikiText-2 validation split from the assets")
    parser.add_argument("--eval-file", default=None, help="default: WikiText-2 test split from the assets")
    parser.add_argument("--calibration-file", default=None, help="MoE partitions (default: the training text)")
    parser.add_argument("--eval-tokens", "--ppl-tokens", dest="eval_tokens", type=int, default=32768)
    parser.add_argument("--eval-limit", type=int, default=None,
                        help="items per zero-shot task (default: the full sets; 0: no tasks)")
    parser.add_argument("--task-points", choices=["all", "final"], default="all",
                        help="where the zero-shot tasks run: every point, or only the source and each method's last "
                             "stage (the full sets take ~20 CPU-minutes per 135M model)")
    parser.add_argument("--generation-prompts", type=int, default=200,
                        help="greedy continuations of this many held-out prompts (the first --generation-prompt-tokens "
                             "of each evaluation document) compared with the source's at every point (0: off)")
    parser.add_argument("--generation-tokens", type=int, default=32, help="new tokens per continuation")
    parser.add_argument("--generation-prompt-tokens", type=int, default=256,
                        help="tokens per prompt: longer than the hybrids' window (128 by default), or the check never "
                             "leaves the window, where a LoLCATs hybrid is exact")
    parser.add_argument("--distill", action="store_true",
                        help="linearization stage 2: distil from the source in every method (the default recipe "
                             "already does; the anchors' settings do not)")
    parser.add_argument("--recheck-generation", action="store_true",
                        help="score the finished methods' points again with these generation settings, from their "
                             "saved checkpoints (nothing is trained)")
    parser.add_argument("--overwrite", action="store_true", help="start afresh instead of resuming")
    parser.add_argument("--json", action="store_true", help="print recovery.json instead of the table")
    args = parser.parse_args(argv)

    assets = _assets()
    out = Path(args.out)
    if args.text_file:
        if args.train_file or args.eval_file:
            raise SystemExit("--text-file splits one file into training and evaluation text; do not also pass "
                             "--train-file / --eval-file")
        args.train_file, args.eval_file = split_text_file(Path(args.text_file), out / "data", args.document_separator,
                                                          args.holdout_fraction)
    args.train_file = Path(args.train_file) if args.train_file else assets / "data" / "wikitext2_valid.txt"
    args.eval_file = Path(args.eval_file) if args.eval_file else assets / "data" / "wikitext2_test.txt"
    for flag, path in (("--train-file", args.train_file), ("--eval-file", args.eval_file),
                       ("--calibration-file", args.calibration_file)):
        if path is not None and not Path(path).is_file():
            raise SystemExit(f"{flag} {path} does not exist")
    if args.minutes is not None and not args.minutes > 0:
        raise SystemExit(f"--minutes must be > 0, got {args.minutes}")
    for spec in args.methods:  # refuse a bad method spec before anything runs
        resolve_method(spec)
    check_eval_text(args.source, args.eval_file, args.eval_tokens)

    result_path = out / "recovery.json"
    if args.recheck_generation:
        result = recheck_generation(result_path, args)
        print(json.dumps(result, indent=2) if args.json else format_table(result))
        return 0
    out.mkdir(parents=True, exist_ok=True)
    fresh = args.overwrite
    if args.overwrite:  # start afresh once; rows this run writes are then kept
        result_path.unlink(missing_ok=True)
        args.overwrite = False
    with _locked(out):
        result = _load_earlier(result_path, args) or {
            "source": args.source, "settings": _settings(args), "source_eval": None, "methods": []}
    args.generation_reference = None  # the source is scored before its continuations become the reference
    if result["source_eval"] is None:
        source_eval = {"file": str(args.eval_file), **evaluate_model(Path(args.source), args, assets)}
        result = _merge_and_save(result_path, args, source_eval=source_eval)
    args.generation_reference = generation_reference(args, out)
    for name in args.methods:
        # A lock per method: a second process sharing --out skips the methods another one is running.
        with open(out / f".running-{_work_name(name)}", "w") as claim:
            try:
                fcntl.flock(claim, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                print(f"{name}: another process sharing {out} is running it; skipped here")
                continue
            with _locked(out):
                done = {row["method"] for row in (_load_earlier(result_path, args) or result)["methods"]}
            if name in done:
                print(f"{name}: already in {result_path} (resumed); --overwrite to run it again")
                continue
            if fresh:  # --overwrite: a method's partial run is not resumed either
                (out / _work_name(name) / PROGRESS_FILE).unlink(missing_ok=True)
            row = run_method(name, args.source, out, args, assets)
            result = _merge_and_save(result_path, args, row=row)
            (out / _work_name(name) / PROGRESS_FILE).unlink(missing_ok=True)  # the row holds it now
    result = _merge_and_save(result_path, args)
    print(json.dumps(result, indent=2) if args.json else format_table(result))
    return 0 if all(math.isfinite(p["ppl"]) for r in result["methods"] for p in r["points"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
