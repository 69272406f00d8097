"""Training recipes: a YAML file loaded into a validated dataclass tree, plus dotted ``key=value`` overrides.

A recipe looks like::

    model: ./outputs/stories260K-gated          # local checkpoint dir (required)
    output_dir: ./outputs/stories260K-gated-ft  # checkpoints + final/ (required)
    data:
      train_file: ${HF_ARCH_ASSETS}/data/tinystories_2mib.txt
      document_separator: "<|endoftext|>"
      block_size: 256
    training:
      mode: new_params          # full | lora | new_params | patterns
      objective: lm             # lm | attention_transfer | gate_distillation
      max_steps: 40
      learning_rate: 1.0e-3
    lora:                       # only read in mode lora
      r: 8

Paths (``model``, ``output_dir``, ``data.train_file``, ``data.eval_file``) may use ``${VAR}`` / ``${VAR:-default}``
environment references; ``${HF_ARCH_ASSETS}`` defaults to ``../shared/assets`` (the shared assets seen from the repo
root). Relative paths are resolved against the current working directory when the recipe is loaded.

Overrides are ``dotted.key=value`` strings whose value is parsed with ``yaml.safe_load`` (``training.max_steps=5``,
``lora.target_modules=[q_proj,v_proj]``, ``data.eval_file=null``). Unknown keys and wrong types raise ``ValueError``
naming the key and the file the value came from.
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

DEFAULT_ENV = {"HF_ARCH_ASSETS": "../shared/assets"}


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
class TrainingConfig:
    # full: every parameter; lora: adapters (targets per variant); new_params: only what a conversion added;
    # patterns: the parameters whose names match trainable_patterns (regexes), e.g. ["\\.router\\."] for a
    # router-only warm-up of a refactorized MoE.
    mode: Literal["full", "lora", "new_params", "patterns"] = "full"
    trainable_patterns: list[str] | None = None
    # lm: next-token loss (+ distillation when distill.teacher is set); attention_transfer: stage 1 of a
    # linearization: every linear layer's output is pulled to the softmax attention its frozen source weights
    # compute (MSE), while the residual stream carries the teacher's output; gate_distillation: SeerAttention block
    # gates learn their frozen layers' block-pooled attention maps (KL).
    objective: Literal["lm", "attention_transfer", "gate_distillation"] = "lm"
    max_steps: int = -1  # > 0 overrides num_train_epochs
    num_train_epochs: float = 1.0
    learning_rate: float = 5e-4
    per_device_train_batch_size: int = 8
    per_device_eval_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    warmup_steps: int = 0
    weight_decay: float = 0.0
    lr_scheduler_type: str = "linear"
    logging_steps: int = 10
    save_steps: int = 500
    save_total_limit: int | None = 2
    seed: int = 42
    gradient_checkpointing: bool = False
    bf16: bool = False
    eval_steps: int | None = None  # with data.eval_file: evaluate every N steps (None: only at the end)
    max_grad_norm: float = 1.0
    dataloader_num_workers: int = 0


@dataclass
class LoraSection:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    # None: hf_arch.lora_target_modules(model) for hf_arch variants, peft's defaults for other models.
    target_modules: list[str] | None = None
    merge_on_save: bool = True  # final/ holds a full merged model (False: the adapter only)


@dataclass
class DistillSection:
    # None: off; "self": the model's own frozen source function (a linearized model with its base weights frozen:
    # adapters off, every linear layer computing its softmax teacher), so no second model is loaded; or a path to
    # the teacher checkpoint (e.g. the dense source of a refactorized MoE).
    teacher: str | None = None
    kl_weight: float = 1.0
    lm_weight: float = 1.0
    temperature: float = 2.0


@dataclass
class Recipe:
    model: str = ""
    output_dir: str = ""
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    lora: LoraSection = field(default_factory=LoraSection)
    distill: DistillSection = field(default_factory=DistillSection)
    source: str = field(default="<dict>", metadata={"internal": True})  # where the recipe came from

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out.pop("source", None)
        return out


_REQUIRED = ("model", "output_dir", "data.train_file")
_PATH_KEYS = ("model", "output_dir", "data.train_file", "data.eval_file")


# ----------------------------------------------------------------------------------------------------------- loading


def load_recipe(path_or_dict: str | os.PathLike | dict | Recipe, overrides: typing.Iterable[str] = ()) -> Recipe:
    """Read a YAML recipe (or a dict / Recipe), apply ``key=value`` overrides, validate and resolve paths."""
    if isinstance(path_or_dict, Recipe):
        raw, source = path_or_dict.to_dict(), path_or_dict.source
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
    recipe = _build(Recipe, raw, "", source)
    recipe.source = source
    _validate(recipe)
    _resolve_paths(recipe)
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
    cls = Recipe
    parts = key.split(".")
    for i, part in enumerate(parts):
        fields = _public_fields(cls)
        if part not in fields:
            prefix = ".".join(parts[:i])
            known = ", ".join(sorted(fields))
            raise ValueError(f"{source}: unknown key {key!r} in override ({prefix or 'top level'} has: {known})")
        ftype = _hints(cls)[part]
        if i < len(parts) - 1:
            if not dataclasses.is_dataclass(ftype):
                raise ValueError(f"{source}: unknown key {key!r} in override ({'.'.join(parts[: i + 1])} is a value)")
            cls = ftype


def _public_fields(cls) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}


_HINT_CACHE: dict[type, dict[str, Any]] = {}


def _hints(cls) -> dict[str, Any]:
    if cls not in _HINT_CACHE:
        _HINT_CACHE[cls] = typing.get_type_hints(cls)
    return _HINT_CACHE[cls]


def _build(cls, raw, prefix: str, source: str):
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ValueError(f"{source}: {prefix.rstrip('.') or 'recipe'} must be a mapping, got {raw!r}")
    fields = _public_fields(cls)
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        key = prefix + str(unknown[0])
        raise ValueError(f"{source}: unknown key {key!r} (allowed here: {', '.join(sorted(fields))})")
    hints = _hints(cls)
    kwargs = {}
    for name, value in raw.items():
        ftype = hints[name]
        if dataclasses.is_dataclass(ftype):
            kwargs[name] = _build(ftype, value, f"{prefix}{name}.", source)
        else:
            kwargs[name] = _coerce(value, ftype, prefix + name, source)
    return cls(**kwargs)


def _coerce(value, tp, key: str, source: str):
    """Check ``value`` against the annotation ``tp``; returns the (possibly converted) value or raises ValueError."""
    ok, converted = _match(value, tp)
    if not ok:
        raise ValueError(f"{source}: {key!r} must be {_describe(tp)}, got {value!r} ({type(value).__name__})")
    return converted


def _match(value, tp) -> tuple[bool, Any]:
    origin = typing.get_origin(tp)
    if tp is Any:
        return True, value
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(tp):
            ok, converted = _match(value, arg)
            if ok:
                return True, converted
        return False, None
    if tp is type(None):
        return value is None, None
    if origin is Literal:
        return value in typing.get_args(tp), value
    if origin is list:
        (inner,) = typing.get_args(tp) or (Any,)
        if isinstance(value, str):  # a single name is a one-element list
            value = [value]
        if not isinstance(value, (list, tuple)):
            return False, None
        out = []
        for item in value:
            ok, converted = _match(item, inner)
            if not ok:
                return False, None
            out.append(converted)
        return True, out
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        if isinstance(value, bool):
            return False, None
        if isinstance(value, int):
            return True, value
        if isinstance(value, float) and value.is_integer():
            return True, int(value)
        return False, None
    if tp is float:
        if isinstance(value, bool):
            return False, None
        if isinstance(value, (int, float)):
            return True, float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                return True, float(value)
            except ValueError:
                return False, None
        return False, None
    if tp is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, str(value)  # e.g. a numeric directory name
        return isinstance(value, str), value
    return isinstance(value, tp), value


def _describe(tp) -> str:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_describe(typing.get_args(tp)[0])}"
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(tp, getattr(tp, "__name__", str(tp)))


# -------------------------------------------------------------------------------------------------------- validation


def _get(recipe: Recipe, dotted: str):
    node = recipe
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def _set(recipe: Recipe, dotted: str, value) -> None:
    *parents, last = dotted.split(".")
    node = recipe
    for part in parents:
        node = getattr(node, part)
    setattr(node, last, value)


def _validate(recipe: Recipe) -> None:
    src = recipe.source
    for key in _REQUIRED:
        if not _get(recipe, key):
            raise ValueError(f"{src}: {key!r} is required")
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


def _resolve_paths(recipe: Recipe) -> None:
    for key in _PATH_KEYS:
        value = _get(recipe, key)
        if value:
            expanded = os.path.expanduser(expand_env(value, recipe.source))
            _set(recipe, key, str(Path(expanded).resolve()))
    teacher = recipe.distill.teacher
    if teacher and teacher != "self":
        recipe.distill.teacher = str(Path(os.path.expanduser(expand_env(teacher, recipe.source))).resolve())
