"""``convert(src, out, to=...)``: load a source checkpoint, apply a conversion kind, verify, write atomically."""

from __future__ import annotations

import datetime
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .acm import ACMConversionOptions, acmize
from .checkpoint_io import atomic_output_dir, check_local_checkpoint
from .gate_insertion import GateInsertionOptions, insert_gates
from .head_growth import SignalHeadGrowthOptions, grow_signal_heads
from .tokenformer_growth import TokenFormerGrowthOptions, grow_tokenformer
from .identity_insertion import (
    AffineInsertionOptions,
    ValueBankInsertionOptions,
    insert_affine_scale,
    insert_value_bank,
)
from .linearize import LINEAR_TARGETS, LinearizeOptions, linearize_to
from .moe_refactor import MoERefactorOptions, refactor_moe
from .sparsify import SparsifyOptions, sparsify

logger = logging.getLogger(__name__)

RECORD_FILE = "hf_arch_conversion.json"



@dataclass(frozen=True)
class ConversionKind:
    """One ``--to`` target: its options dataclass (``config_overrides()``, where defined, validates it up front),
    ``convert(source_model, options, **extra) -> model`` (built with ``weights.build_from_source``), the option
    defaults this target changes, and the ``method`` values it accepts (None: any its options class accepts)."""

    options_class: type
    convert: Callable
    defaults: dict = field(default_factory=dict)
    methods: tuple[str, ...] | None = None
    # {name: options}: conversions of a tiny model that pin checkpoint-compatibility fixtures (make_compat_fixtures.py)
    examples: dict = field(default_factory=dict)

    def __iter__(self):  # (options class, function), as the table's entries were
        return iter((self.options_class, self.convert))


# Conversion kinds by target variant; more register with ``register_conversion`` (the CLI's ``--to`` reads this).
CONVERSIONS: dict[str, ConversionKind] = {}


def register_conversion(to: str, options_class: type, convert: Callable, *, methods: tuple[str, ...] | None = None,
                        examples: dict | None = None, **defaults) -> ConversionKind:
    """Make ``hf-arch convert SRC OUT --to {to}`` (and ``convert(..., to=to)``) run ``convert`` with
    ``options_class(**{**defaults, **given})``; the CLI passes the flags the user gave whose names are its fields."""
    unknown = sorted(set(defaults) - set(options_class.__dataclass_fields__))
    if unknown:
        raise ValueError(f"register_conversion({to!r}): {options_class.__name__} has no fields {unknown}")
    kind = ConversionKind(options_class, convert, dict(defaults), methods, dict(examples or {}))
    CONVERSIONS[to] = kind
    return kind


register_conversion("gated_attention", GateInsertionOptions, insert_gates)
register_conversion("moe", MoERefactorOptions, refactor_moe)
register_conversion("acm", ACMConversionOptions, acmize,
                    examples={"exact": dict(learners=2, learner_steps=0, gate_steps=0)})


def register_linearization(to: str, default_method: str, examples: dict | None = None) -> ConversionKind:
    """``--to {to}``: linearization into a registered linear target (``linearize.register_linear_target``)."""
    return register_conversion(to, LinearizeOptions, linearize_to(to), methods=tuple(LINEAR_TARGETS[to].methods),
                               examples=examples, method=default_method)


register_linearization("gla", "liger")
register_linearization("gated_deltanet", "mamba_init")
register_conversion("sparse_attention", SparsifyOptions, sparsify)
register_conversion("affine_attention", AffineInsertionOptions, insert_affine_scale)
register_conversion("move", ValueBankInsertionOptions, insert_value_bank)
register_conversion("diff_attention", SignalHeadGrowthOptions, grow_signal_heads)
register_conversion("tokenformer", TokenFormerGrowthOptions, grow_tokenformer,
                    examples={"grow": dict(grow=4, grow_ffn=6)})
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ConversionResult:
    output_dir: Path
    record: dict = field(default_factory=dict)

    @property
    def max_abs_logit_diff(self) -> float | None:
        return self.record.get("max_abs_logit_diff")


def conversion_options(to: str, **options):
    if to not in CONVERSIONS:
        raise ValueError(f"Unknown conversion target {to!r}; available: {', '.join(sorted(CONVERSIONS))}")
    kind = CONVERSIONS[to]
    known = set(kind.options_class.__dataclass_fields__)
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"Unknown option(s) {unknown} for --to {to}; valid options: {sorted(known)}")
    opts = kind.options_class(**{**kind.defaults, **options})
    if kind.methods is not None and opts.method not in kind.methods:
        raise ValueError(f"--to {to} takes --method {' | '.join(kind.methods)}, not {opts.method!r}")
    if callable(getattr(opts, "config_overrides", None)):
        opts.config_overrides()  # validates option values before any loading
    return opts


def convert_model(source_model, to: str = "gated_attention", **options):
    """In-memory conversion of an already loaded source model."""
    opts = conversion_options(to, **options)  # validates `to` and the options
    return CONVERSIONS[to].convert(source_model, opts)


def calibration_tokens(src, path, count: int, trust_remote_code: bool = False) -> torch.Tensor:
    """``[rows, 512]`` token ids: the first ``count`` tokens of the text file (fewer if it is shorter)."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"calibration file {path} does not exist")
    tokenizer = AutoTokenizer.from_pretrained(src, trust_remote_code=trust_remote_code)
    ids = tokenizer(path.read_text(encoding="utf-8")[: count * 16], return_tensors="pt").input_ids[0][:count]
    if ids.numel() < 16:
        raise ValueError(f"calibration file {path} holds only {ids.numel()} tokens; give at least a few hundred")
    row = min(512, ids.numel())
    return ids[: (ids.numel() // row) * row].view(-1, row)


@torch.no_grad()
def max_abs_logit_diff(source_model, target_model, input_ids: torch.Tensor) -> float:
    """max |Δlogit| between two models on the same tokens (logits compared in fp32; the models are not cast)."""
    a = source_model(input_ids).logits.float()
    b = target_model(input_ids).logits.float()
    return (a - b).abs().max().item()


def convert(
    src: str | Path,
    out: str | Path,
    to: str = "gated_attention",
    *,
    dtype: str = "auto",
    overwrite: bool = False,
    verify: bool = True,
    verify_tokens: int = 64,
    remote_code: bool = True,
    trust_remote_code: bool = False,
    calibration_file: str | Path | None = None,
    **options,
) -> ConversionResult:
    """Convert checkpoint ``src`` (local dir or Hub id) into variant ``to`` and write it to ``out``.

    The output holds config, safetensors weights, tokenizer, generation config, the flat remote-code files and
    ``hf_arch_conversion.json`` (source, options, versions, max |Δlogit| against the source in fp32).
    ``calibration_file``: text whose tokens calibrate conversions that need activation statistics (MoE
    ``split="activation"`` or ``shared_neurons``).
    """
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    import hf_arch  # noqa: F401  (registration)

    opts = conversion_options(to, **options)
    out = Path(out)
    if out.exists() and not overwrite:  # fail before the (slow) load
        raise FileExistsError(f"Output {out} already exists; pass --overwrite (overwrite=True) to replace it")
    if dtype != "auto" and dtype not in DTYPES:
        raise ValueError(f"dtype must be 'auto' or one of {sorted(DTYPES)}, got {dtype!r}")
    src_path = Path(src)
    if src_path.exists() or str(src).startswith((".", "/", "~")):
        check_local_checkpoint(src_path)
    try:
        source_config = AutoConfig.from_pretrained(src, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        raise ValueError(f"{src} is neither a local checkpoint directory nor a reachable Hub repo: {error}") from error
    from .sources import adapter_for

    accepted = getattr(opts, "source_model_types", None)  # conversions that start from one of our variants
    if accepted is not None and source_config.model_type not in accepted:
        raise ValueError(f"--to {to} converts a {' / '.join(accepted)} checkpoint; {src} is "
                         f"{source_config.model_type!r}")
    if accepted is None:
        adapter_for(source_config)  # unsupported architecture → clear error before loading weights
    save_dtype = DTYPES[dtype] if dtype != "auto" else (getattr(source_config, "dtype", None) or torch.float32)
    if isinstance(save_dtype, str):
        save_dtype = DTYPES.get(save_dtype, torch.float32)

    logger.info("Loading %s", src)
    try:
        source = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32, trust_remote_code=trust_remote_code)
    except Exception as error:
        raise ValueError(f"Could not load the weights of {src}: {error}") from error
    source.eval()
    convert_fn = CONVERSIONS[to].convert
    extra = {}
    if getattr(opts, "needs_calibration", False):
        if calibration_file is None:
            raise ValueError(f"--to {to} with {opts.as_dict()} needs calibration text: pass --calibration-file "
                             "(calibration_file=...)")
        extra["calibration_ids"] = calibration_tokens(src, calibration_file, opts.calibration_tokens,
                                                      trust_remote_code)
    # New parameters take random initialisations: seeded (the options' seed where they have one, else 0; the
    # caller's RNG untouched) so that a conversion is reproducible.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(getattr(opts, "seed", 0))
        target = convert_fn(source, opts, **extra)
    # What the conversion measured or decided (e.g. options filled in from the source, router fits), if it says.
    report = target.__dict__.pop("conversion_report", None)

    diff = None
    if verify:
        generator = torch.Generator().manual_seed(0)
        tokens = torch.randint(0, source_config.vocab_size, (2, verify_tokens), generator=generator)
        diff = max_abs_logit_diff(source, target, tokens)
        logger.info("max |Δlogit| after conversion (fp32): %.3g", diff)
    del source

    record = {
        "source": str(src),
        "source_model_type": source_config.model_type,
        "source_architecture": (source_config.architectures or [None])[0],
        "variant": to,
        "model_type": target.config.model_type,
        "options": opts.as_dict(),
        **({"report": report} if report else {}),
        "dtype": str(save_dtype).replace("torch.", ""),
        "max_abs_logit_diff": diff,
        "verify_tokens": verify_tokens if verify else 0,
        "new_parameters": hf_arch.new_parameter_names(target),
        "versions": {"hf_arch": hf_arch.__version__, "torch": torch.__version__, "transformers": transformers.__version__},
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        # Every hf-arch save writes the flat remote-code files and auto_map (HfArchPreTrainedModel.save_pretrained).
        target.to(save_dtype).save_pretrained(tmp, remote_code=remote_code)
        try:
            AutoTokenizer.from_pretrained(src, trust_remote_code=trust_remote_code).save_pretrained(tmp)
        except (OSError, ValueError) as error:
            logger.warning("No tokenizer saved: could not load one from %s (%s)", src, error)
        (tmp / RECORD_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return ConversionResult(output_dir=out, record=record)
