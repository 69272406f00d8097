"""Training recipes: a YAML file parsed with transformers' ``HfArgumentParser``, plus dotted ``key=value`` overrides.

A recipe looks like::

    model: ./outputs/stories260K-gated          # local checkpoint dir (required)
    output_dir: ./outputs/stories260K-gated-ft  # checkpoints + final/ (required)
    data:
      train_file: ${HF_ARCH_ASSETS}/data/tinystories_2mib.txt
      document_separator: "<|endoftext|>"
      block_size: 256
    training:                   # transformers' TrainingArguments (any field), plus mode / trainable_patterns / objective
      mode: new_params          # full | lora | new_params | patterns
      objective: lm             # lm | attention_transfer | gate_distillation
      max_steps: 40
      learning_rate: 1.0e-3
    lora:                       # only read in mode lora
      r: 8

Sections and the dataclass each is parsed into: the top level (``model``, ``output_dir``: :class:`RecipePaths`),
``data`` (:class:`DataConfig`), ``training`` (:class:`RecipeTrainingArguments`, a ``TrainingArguments`` subclass, so
every TrainingArguments field works: ``optim``, ``lr_scheduler_kwargs``, ``eval_strategy``, …), ``lora``
(:class:`LoraSection`) and ``distill`` (:class:`DistillSection`). Each section goes through ``HfArgumentParser``: its
argparse types convert every value (ints, floats — YAML 1.1 reads ``1e-4`` as a string —, booleans, the choices of
``Literal`` and enum fields, lists; a single value for a list field is a one-element list; mappings and nulls are taken
as they are), then ``HfArgumentParser.parse_dict`` builds the dataclass (TrainingArguments checks its own values).

Paths (``model``, ``output_dir``, ``data.train_file``, ``data.eval_file``, a ``distill.teacher`` path) may use
``${VAR}`` / ``${VAR:-default}`` environment references; ``${HF_ARCH_ASSETS}`` defaults to ``../shared/assets`` (the
shared assets seen from the repo root). Relative paths are resolved against the current working directory when the
recipe is loaded. ``training.output_dir`` is the top-level ``output_dir``.

Overrides are ``dotted.key=value`` strings whose value is parsed with ``yaml.safe_load`` (``training.max_steps=5``,
``lora.target_modules=[q_proj,v_proj]``, ``data.eval_file=null``). Unknown keys and wrong values raise ``ValueError``
naming the key (``section.key``) and the file the value came from.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import functools
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml
from transformers import HfArgumentParser, TrainingArguments

DEFAULT_ENV = {"HF_ARCH_ASSETS": "../shared/assets"}


@dataclass
class RecipePaths:
    """The recipe's top level."""

    model: str = ""  # required: the checkpoint dir to train
    output_dir: str = ""  # required: checkpoints + final/ (also the TrainingArguments' output_dir)


@dataclass
class DataConfig:
    train_file: str = ""  # required: .txt (plain text) or .jsonl/.json (one record per line)
    format: Literal["text", "jsonl"] | None = None  # None: from the extension (.jsonl/.json -> jsonl, else text)
    text_field: str = "text"  # jsonl: the field holding each document's text
    # text files: the line that separates documents (e.g. "<|endoftext|>"). None: documents are separated by blank
    # lines (one document per paragraph; a file without blank lines is one document).
    document_separator: str | None = None
    drop_last_document: bool = False  # e.g. a file cut mid-document (tinystories_2mib.txt)
    eval_file: str | None = None
    block_size: int = 256
    packing: bool = True  # True: concatenate documents and cut fixed blocks (remainder dropped); False: one per doc
    max_documents: int | None = None  # use only the first N documents
    max_train_samples: int | None = None  # use only the first N training blocks/examples
    add_bos: bool = True  # prepend BOS to each document (stories260K separates stories with BOS)
    add_eos: bool = False  # append EOS to each document


@dataclass
class RecipeTrainingArguments(TrainingArguments):
    """transformers' ``TrainingArguments`` plus what a recipe trains (``mode``, ``trainable_patterns``) and on which
    objective, with defaults for fine-tuning a converted checkpoint where they differ from TrainingArguments'.

    Set by the recipe loader unless given: ``output_dir`` (always the top-level one), ``data_seed`` (= ``seed``),
    ``eval_strategy`` ("steps" with ``data.eval_file`` and ``eval_steps``, else "no"), ``dataloader_pin_memory`` (on
    CUDA only) and, with gradient checkpointing on, its kwargs ``{"use_reentrant": False}``."""

    # full: every parameter; lora: adapters (targets per variant); new_params: only what a conversion added;
    # patterns: the parameters whose names match trainable_patterns (regexes), e.g. ["\\.router\\."] for a
    # router-only warm-up of a refactorized MoE.
    mode: Literal["full", "lora", "new_params", "patterns"] = field(
        default="full", metadata={"help": "which parameters train: full | lora | new_params | patterns"})
    trainable_patterns: list[str] | None = field(
        default=None, metadata={"help": "mode patterns: regexes on parameter names that train"})
    # lm: next-token loss (+ distillation when distill.teacher is set); attention_transfer: stage 1 of a
    # linearization: every linear layer's output is pulled to the softmax attention its frozen source weights
    # compute (MSE), while the residual stream carries the teacher's output; gate_distillation: SeerAttention block
    # gates learn their frozen layers' block-pooled attention maps (KL).
    objective: Literal["lm", "attention_transfer", "gate_distillation"] = field(
        default="lm", metadata={"help": "the loss: lm | attention_transfer | gate_distillation"})
    # A time budget: training stops at the first step end past it (the schedule still spans max_steps, so
    # pick max_steps from a measured step time, as `hf-arch bench recovery --minutes` does).
    max_train_minutes: float | None = field(
        default=None, metadata={"help": "stop training after this many minutes (None: no time limit)"})
    # "cpu" counts this process's CPU time, which other jobs on a shared machine do not eat into (a fair budget when
    # methods are compared side by side); with N threads a CPU-minute passes N times faster than a wall minute.
    budget_clock: Literal["wall", "cpu"] = field(
        default="wall", metadata={"help": "how max_train_minutes is counted: wall | cpu (this process's CPU time)"})
    # LASP-2 (hf_arch.sequence_parallel): each batch split along the sequence over this many processes (all of
    # them: `accelerate launch --num_processes N` / `torchrun --nproc-per-node N`); 1: off.
    sequence_parallel_size: int = field(
        default=1, metadata={"help": "split every sequence over this many processes (LASP-2; = the process count)"})
    # Recipe defaults (TrainingArguments' own in brackets).
    learning_rate: float = field(default=5e-4, metadata={"help": "peak learning rate [5e-5]"})
    num_train_epochs: float = field(default=1.0, metadata={"help": "epochs when max_steps is -1 [3.0]"})
    logging_steps: float = field(default=10, metadata={"help": "log every N steps [500]"})
    save_total_limit: int | None = field(default=2, metadata={"help": "checkpoints kept [None: all]"})
    logging_first_step: bool = field(default=True, metadata={"help": "log the first step's loss [False]"})
    # A NaN must reach NanLossCallback, not be filtered out.
    logging_nan_inf_filter: bool = field(default=False, metadata={"help": "drop NaN/inf losses from logs [True]"})
    remove_unused_columns: bool = field(default=False, metadata={"help": "drop dataset columns [True]"})
    # Evaluation reports the objective's loss; logits are never gathered.
    prediction_loss_only: bool = field(default=True, metadata={"help": "evaluate the loss only [False]"})
    report_to: None | str | list[str] = field(default="none", metadata={"help": "logging integrations [none]"})
    ddp_find_unused_parameters: bool | None = field(default=False, metadata={"help": "DDP's flag [None]"})


@dataclass
class LoraSection:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    # None: hf_arch.lora_target_modules(model) for hf_arch variants, peft's defaults for other models.
    target_modules: list[str] | None = None
    merge_on_save: bool = True  # final/ holds a full merged model (False: the adapter only)
    # Also train, at full rank, the parameters a conversion added (gates, decays, feature maps, short convs): an
    # hf_arch variant's new parameters, otherwise frozen under LoRA.
    train_new_params: bool = False


@dataclass
class DistillSection:
    # None: off; "self": the model's own frozen source function (a linearized model with its base weights frozen:
    # adapters off, every linear layer computing its softmax teacher), so no second model is loaded; or a path to
    # the teacher checkpoint (e.g. the dense source of a refactorized MoE).
    teacher: str | None = None
    kl_weight: float = 1.0
    lm_weight: float = 1.0
    temperature: float = 2.0


# The recipe's sections: YAML key -> the dataclass HfArgumentParser parses it into.
SECTIONS: dict[str, type] = {"data": DataConfig, "training": RecipeTrainingArguments, "lora": LoraSection,
                             "distill": DistillSection}


@dataclass
class Recipe:
    model: str
    output_dir: str
    data: DataConfig
    training: RecipeTrainingArguments
    lora: LoraSection
    distill: DistillSection
    source: str = "<dict>"  # where the recipe came from
    raw: dict = field(default_factory=dict, repr=False)  # the mapping it was parsed from (overrides applied)

    def to_dict(self) -> dict:
        """The parsed recipe for records: sections as dicts, ``training`` as ``TrainingArguments.to_dict()`` (every
        effective argument, tokens hidden)."""
        return {"model": self.model, "output_dir": self.output_dir, "data": dataclasses.asdict(self.data),
                "training": self.training.to_dict(), "lora": dataclasses.asdict(self.lora),
                "distill": dataclasses.asdict(self.distill)}


_REQUIRED = ("model", "output_dir", "data.train_file")


# ----------------------------------------------------------------------------------------------------------- loading


def load_recipe(path_or_dict: str | os.PathLike | dict | Recipe, overrides: typing.Iterable[str] = ()) -> Recipe:
    """Read a YAML recipe (or a dict / Recipe), apply ``key=value`` overrides, parse every section, resolve paths
    and validate."""
    if isinstance(path_or_dict, Recipe):
        raw, source = path_or_dict.raw, path_or_dict.source
    elif isinstance(path_or_dict, dict):
        raw, source = dict(path_or_dict), "<dict>"
    else:
        source = str(path_or_dict)
        path = Path(path_or_dict)
        if not path.is_file():
            raise FileNotFoundError(f"recipe file {source} does not exist")
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as err:
            raise ValueError(f"{source}: not valid YAML: {err}") from None
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise ValueError(f"{source}: a recipe must be a YAML mapping, got {type(raw).__name__}")
    raw = _deep_copy(raw)
    for override in overrides:
        _apply_override(raw, override, source)
    recipe = _build(raw, source)
    _validate(recipe)
    return recipe


def _deep_copy(value):
    if isinstance(value, dict):
        return {k: _deep_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_deep_copy(v) for v in value]
    return value


def _apply_override(raw: dict, override: str, source: str) -> None:
    if "=" not in override:
        raise ValueError(f"override {override!r} (for {source}) must look like key=value, e.g. training.max_steps=5")
    key, text = override.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ValueError(f"override {override!r} (for {source}) has an empty key")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text  # e.g. an unbalanced bracket: keep the literal string
    _check_key_exists(key, source)
    parts = key.split(".")
    node = raw
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ValueError(f"{source}: override {key!r}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value


def _check_key_exists(key: str, source: str) -> None:
    """An override's key names a top-level value, a section, or a key of a section."""
    head, *rest = key.split(".")
    if head in SECTIONS:
        if rest and rest[0] not in _init_fields(SECTIONS[head]):
            raise _unknown_key(f"{head}.{rest[0]}", _init_fields(SECTIONS[head]), head, source, " in override")
        if len(rest) > 1:
            raise ValueError(f"{source}: unknown key {key!r} in override ({head}.{rest[0]} is a value)")
    elif head in _init_fields(RecipePaths):
        if rest:
            raise ValueError(f"{source}: unknown key {key!r} in override ({head} is a value)")
    else:
        raise _unknown_key(head, [*_init_fields(RecipePaths), *SECTIONS], "", source, " in override")


def _init_fields(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.init]


def _unknown_key(key: str, allowed, section: str, source: str, where: str = "") -> ValueError:
    """The error for an unknown key: close matches, and the allowed keys where they are few."""
    name = key.rsplit(".", 1)[-1]
    close = difflib.get_close_matches(name, list(allowed), n=3)
    hints = [f"did you mean {' or '.join(repr(c) for c in close)}?"] if close else []
    if len(allowed) <= 20:
        hints.append(f"{section or 'the top level'} has: {', '.join(sorted(allowed))}")
    else:  # training: every TrainingArguments field
        hints.append(f"{section} takes the fields of transformers.TrainingArguments plus mode, trainable_patterns and "
                     "objective")
    return ValueError(f"{source}: unknown key {key!r}{where} ({'; '.join(hints)})")


@functools.cache
def _parser(cls) -> HfArgumentParser:
    # exit_on_error=False: a bad value raises argparse.ArgumentError (turned into a ValueError naming the key)
    # instead of printing usage and exiting.
    return HfArgumentParser(cls, exit_on_error=False)


def _parse_section(cls, values, section: str, source: str, defaults: dict | None = None):
    """``values`` (a mapping from the recipe) → an instance of the dataclass ``cls``, through HfArgumentParser: every
    value converted by the argparse type of its field, then ``parse_dict``. ``defaults``: values the loader sets
    when the recipe does not."""
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ValueError(f"{source}: {section or 'recipe'} must be a mapping, got {values!r}")
    fields = _init_fields(cls)
    prefix = f"{section}." if section else ""
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise _unknown_key(prefix + str(unknown[0]), fields, section, source)
    typed = {key: _typed_value(cls, key, value, prefix, source) for key, value in values.items()}
    for key, value in (defaults or {}).items():
        typed.setdefault(key, value)
    try:
        (parsed,) = _parser(cls).parse_dict(typed)
    except (ValueError, TypeError) as err:  # the dataclass's own checks (TrainingArguments.__post_init__)
        raise ValueError(f"{source}: {section or 'recipe'}: {err}") from None
    return parsed


def _typed_value(cls, key: str, value, prefix: str, source: str):
    """``value`` converted by HfArgumentParser's argparse action for the field ``key`` of ``cls`` (each item of a
    list; a scalar for a list field becomes a one-element list). Nulls, mappings and empty lists pass as they are."""
    if value is None or isinstance(value, dict) or (isinstance(value, (list, tuple)) and not value):
        return value
    if not isinstance(value, (list, tuple)):
        return _argparse_value(cls, key, value, prefix, source)
    items = [_argparse_value(cls, key, item, prefix, source) for item in value]
    if all(isinstance(item, list) for item in items):  # a list field (argparse nargs): one list
        return [element for item in items for element in item]
    if _takes_a_list(cls, key):  # e.g. report_to (str or list[str]), which argparse reads as one string
        return items
    raise ValueError(f"{source}: {prefix + key!r} takes one value, got a list {value!r}")


@functools.cache
def _type_hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _takes_a_list(cls, key: str) -> bool:
    hint = _type_hints(cls)[key]
    return any(typing.get_origin(option) is list for option in (typing.get_args(hint) or (hint,)))


def _argparse_value(cls, key: str, value, prefix: str, source: str):
    if isinstance(value, (list, tuple, dict)):
        raise ValueError(f"{source}: {prefix + key!r} must not nest lists or mappings, got {value!r}")
    text = ("true" if value else "false") if isinstance(value, bool) else str(value)
    try:  # "--key=text": a value starting with "-" stays a value
        namespace, _ = _parser(cls).parse_known_args([f"--{key}={text}"])
    except argparse.ArgumentError as err:
        raise ValueError(f"{source}: {prefix + key!r}: {err.message}") from None
    return getattr(namespace, key)


def _build(raw: dict, source: str) -> Recipe:
    allowed = [*_init_fields(RecipePaths), *SECTIONS]
    unknown = sorted(set(raw) - set(allowed), key=str)
    if unknown:
        raise _unknown_key(str(unknown[0]), allowed, "", source)
    for name in SECTIONS:
        if raw.get(name) is not None and not isinstance(raw[name], dict):
            raise ValueError(f"{source}: {name} must be a mapping, got {raw[name]!r}")
    paths = _parse_section(RecipePaths, {k: v for k, v in raw.items() if k not in SECTIONS}, "", source)
    data = _parse_section(DataConfig, raw.get("data"), "data", source)
    lora = _parse_section(LoraSection, raw.get("lora"), "lora", source)
    distill = _parse_section(DistillSection, raw.get("distill"), "distill", source)
    for key in _REQUIRED:
        section, _, name = key.rpartition(".")
        if not getattr(data if section == "data" else paths, name):
            raise ValueError(f"{source}: {key!r} is required")
    _resolve_paths(paths, data, distill, source)
    training_values = raw.get("training") or {}
    if "output_dir" in training_values:
        raise ValueError(f"{source}: 'training.output_dir': set output_dir at the top level of the recipe")
    training = _parse_section(RecipeTrainingArguments, training_values, "training", source,
                              defaults=_training_defaults(training_values, paths, data, source))
    return Recipe(model=paths.model, output_dir=paths.output_dir, data=data, training=training, lora=lora,
                  distill=distill, source=source, raw=raw)


def _training_defaults(values: dict, paths: RecipePaths, data: DataConfig, source: str) -> dict:
    """The TrainingArguments the loader derives from the rest of the recipe (used where ``training`` has no value)."""
    import torch

    def given(key):
        return _typed_value(RecipeTrainingArguments, key, values[key], "training.", source) if key in values else \
            next(f.default for f in dataclasses.fields(RecipeTrainingArguments) if f.name == key)

    defaults = {
        "output_dir": paths.output_dir,
        "data_seed": given("seed"),
        "eval_strategy": "steps" if data.eval_file and given("eval_steps") else "no",
        "dataloader_pin_memory": torch.cuda.is_available(),
    }
    # Gradient (activation) checkpointing under whichever name the installed transformers has (5.2x renamed it): not
    # reentrant unless the recipe says otherwise.
    names = [n for n in ("activation_checkpointing", "gradient_checkpointing")
             if n in _init_fields(RecipeTrainingArguments)]
    enabled = [n for n in names if values.get(n)]
    if enabled and not any(values.get(f"{n}_kwargs") for n in names):
        defaults[f"{enabled[0]}_kwargs"] = {"use_reentrant": False}
    return defaults


# -------------------------------------------------------------------------------------------------------- validation


def _validate(recipe: Recipe) -> None:
    src = recipe.source
    d, t, lora = recipe.data, recipe.training, recipe.lora
    positive = {
        "data.block_size": d.block_size,
        "training.per_device_train_batch_size": t.per_device_train_batch_size,
        "training.per_device_eval_batch_size": t.per_device_eval_batch_size,
        "training.gradient_accumulation_steps": t.gradient_accumulation_steps,
        "training.logging_steps": t.logging_steps,
        "training.save_steps": t.save_steps,
        "lora.r": lora.r,
    }
    optional_positive = {
        "data.max_documents": d.max_documents,
        "data.max_train_samples": d.max_train_samples,
        "training.eval_steps": t.eval_steps,
        "training.save_total_limit": t.save_total_limit,
    }
    for key, value in {**positive, **{k: v for k, v in optional_positive.items() if v is not None}}.items():
        if value <= 0:
            raise ValueError(f"{src}: {key!r} must be > 0, got {value}")
    if t.learning_rate <= 0:
        raise ValueError(f"{src}: 'training.learning_rate' must be > 0, got {t.learning_rate}")
    if t.max_steps == 0 or t.max_steps < -1:
        raise ValueError(f"{src}: 'training.max_steps' must be > 0 (or -1 to use num_train_epochs), got {t.max_steps}")
    if t.max_steps == -1 and t.num_train_epochs <= 0:
        raise ValueError(f"{src}: 'training.num_train_epochs' must be > 0 when max_steps is -1")
    if t.warmup_steps < 0 or t.weight_decay < 0 or t.max_grad_norm < 0:
        raise ValueError(f"{src}: training.warmup_steps / weight_decay / max_grad_norm must be >= 0")
    if not 0.0 <= lora.dropout < 1.0:
        raise ValueError(f"{src}: 'lora.dropout' must be in [0, 1), got {lora.dropout}")
    if t.mode == "patterns" and not t.trainable_patterns:
        raise ValueError(f"{src}: training.mode 'patterns' needs training.trainable_patterns (regexes on parameter "
                         "names, e.g. ['\\.router\\.'])")
    if t.trainable_patterns and t.mode != "patterns":
        raise ValueError(f"{src}: training.trainable_patterns is read in training.mode 'patterns' only "
                         f"(mode is {t.mode!r})")
    for pattern in t.trainable_patterns or []:
        try:
            re.compile(pattern)
        except re.error as err:
            raise ValueError(f"{src}: training.trainable_patterns entry {pattern!r} is not a regex: {err}") from None
    if t.objective in ("attention_transfer", "gate_distillation") and t.mode not in ("new_params", "patterns"):
        raise ValueError(f"{src}: training.objective {t.objective!r} keeps the source weights frozen as the "
                         f"teacher; use training.mode new_params or patterns (got {t.mode!r})")
    dist = recipe.distill
    if dist.teacher is not None:
        if t.objective != "lm":
            raise ValueError(f"{src}: distill.teacher applies to training.objective 'lm'")
        if dist.teacher == "self" and t.mode == "full":
            raise ValueError(f"{src}: distill.teacher 'self' needs frozen source weights (mode lora, new_params or "
                             "patterns); with mode full give the source checkpoint's path")
        if dist.kl_weight < 0 or dist.lm_weight < 0 or dist.kl_weight + dist.lm_weight == 0:
            raise ValueError(f"{src}: distill.kl_weight and distill.lm_weight must be >= 0 and not both 0")
        if dist.temperature <= 0:
            raise ValueError(f"{src}: 'distill.temperature' must be > 0, got {dist.temperature}")
    if t.sequence_parallel_size < 1:
        raise ValueError(f"{src}: 'training.sequence_parallel_size' must be >= 1, got {t.sequence_parallel_size}")
    if t.sequence_parallel_size > 1 and (t.objective != "lm" or dist.teacher is not None):
        raise ValueError(f"{src}: training.sequence_parallel_size > 1 trains the next-token objective only (objective "
                         f"{t.objective!r}, distill.teacher {dist.teacher!r})")
    if t.sequence_parallel_size > 1 and t.sequence_parallel_size > d.block_size:
        raise ValueError(f"{src}: data.block_size {d.block_size} cannot be split across training.sequence_parallel_size "
                         f"{t.sequence_parallel_size} processes (a world size larger than the number of chunks)")
    if d.document_separator is not None and not d.document_separator.strip():
        raise ValueError(f"{src}: 'data.document_separator' must not be blank (leave it unset for paragraphs)")


# ------------------------------------------------------------------------------------------------------------- paths

_ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)")


def expand_env(text: str, source: str = "<recipe>") -> str:
    """Expand ``${VAR}``, ``${VAR:-default}`` and ``$VAR``; HF_ARCH_ASSETS defaults to ``../shared/assets``."""

    def repl(match: re.Match) -> str:
        name = match.group(1) or match.group(3)
        default = match.group(2)
        value = os.environ.get(name)
        if value:
            return value
        if default is not None:
            return default
        if name in DEFAULT_ENV:
            return DEFAULT_ENV[name]
        raise ValueError(f"{source}: environment variable {name} used in {text!r} is not set")

    return _ENV_RE.sub(repl, text)


def _resolve_path(value: str, source: str) -> str:
    return str(Path(os.path.expanduser(expand_env(value, source))).resolve())


def _resolve_paths(paths: RecipePaths, data: DataConfig, distill: DistillSection, source: str) -> None:
    """Environment references expanded and relative paths made absolute (against the current directory)."""
    paths.model, paths.output_dir = _resolve_path(paths.model, source), _resolve_path(paths.output_dir, source)
    data.train_file = _resolve_path(data.train_file, source)
    if data.eval_file:
        data.eval_file = _resolve_path(data.eval_file, source)
    if distill.teacher and distill.teacher != "self":
        distill.teacher = _resolve_path(distill.teacher, source)
