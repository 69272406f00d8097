"""The variant registry: one entry per architecture variant, registered with the transformers Auto classes."""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification


@dataclass(frozen=True)
class Variant:
    """Everything the CLI, conversions, recipes and model cards need to know about one variant."""

    name: str  # short name used on the command line: `--to gated_attention`
    config_class: type
    model_class: type
    causal_lm_class: type
    sequence_classification_class: type
    summary: str  # one line for `hf-arch variants`
    paper: str
    # LoRA targets and the parameters a conversion adds are not listed here: they come from the modules a model
    # has (hf_arch.peft_utils), so configs that compose several variants' mechanisms get all of them.
    tags: tuple[str, ...] = field(default_factory=tuple)
    # Small layouts that exercise this variant: {name: config fields on top of any tiny size}. The shared suites
    # (cached generation, packed rows, remote code, checkpoint-compatibility fixtures) run every variant's examples,
    # so a variant registered with them is tested like the others without editing a test.
    examples: dict[str, dict] = field(default_factory=dict)

    @property
    def model_type(self) -> str:
        return self.config_class.model_type


VARIANTS: dict[str, Variant] = {}


def register_variant(variant: Variant) -> Variant:
    """Add a variant and register it with AutoConfig / AutoModel / AutoModelForCausalLM / …SequenceClassification."""
    VARIANTS[variant.name] = variant
    AutoConfig.register(variant.model_type, variant.config_class, exist_ok=True)
    AutoModel.register(variant.config_class, variant.model_class, exist_ok=True)
    AutoModelForCausalLM.register(variant.config_class, variant.causal_lm_class, exist_ok=True)
    AutoModelForSequenceClassification.register(
        variant.config_class, variant.sequence_classification_class, exist_ok=True
    )
    return variant


def get_variant(name_or_model_type: str) -> Variant:
    """Look a variant up by short name (``gated_attention``) or model_type (``hfa_gated_attention``)."""
    for variant in VARIANTS.values():
        if name_or_model_type in (variant.name, variant.model_type):
            return variant
    known = ", ".join(sorted(VARIANTS)) or "(none registered)"
    raise KeyError(f"Unknown variant {name_or_model_type!r}; known variants: {known}")


def example_layouts() -> dict[str, tuple[str, dict]]:
    """``{"<variant>:<example>": (variant name, config fields)}`` over every registered variant's examples."""
    return {f"{variant.name}:{name}": (variant.name, dict(fields))
            for variant in VARIANTS.values() for name, fields in variant.examples.items()}


def variant_of(model_or_config) -> Variant:
    config = getattr(model_or_config, "config", model_or_config)
    return get_variant(config.model_type)
