"""Which parameters to adapt: LoRA targets per variant, and the parameters a conversion added."""

from __future__ import annotations

import re

from torch import nn

from .registry import get_variant


def lora_target_modules(model_or_config, include_new: bool = True) -> list[str]:
    """Module-name suffixes for ``peft.LoraConfig(target_modules=...)`` that cover this variant's projections.

    Only names that exist in the model are returned when a model is given, so a variant without, say, a low-rank gate
    never hands peft a target that silently matches nothing.
    """
    config = getattr(model_or_config, "config", model_or_config)
    variant = get_variant(config.model_type)
    targets = [t for t in variant.lora_target_modules if include_new or not _matches_new(variant, "." + t + ".")]
    if isinstance(model_or_config, nn.Module):
        names = [name for name, module in model_or_config.named_modules() if isinstance(module, nn.Linear)]
        targets = [t for t in targets if any(name == t or name.endswith("." + t) for name in names)]
    return targets


def lora_target_parameters(model_or_config) -> list[str]:
    """Parameter-name suffixes for ``peft.LoraConfig(target_parameters=...)``: the variant's 3-D expert weights
    (MoE). Only names that exist are returned when a model is given."""
    config = getattr(model_or_config, "config", model_or_config)
    targets = list(get_variant(config.model_type).lora_target_parameters)
    if isinstance(model_or_config, nn.Module):
        names = [name for name, _ in model_or_config.named_parameters()]
        targets = [t for t in targets if any(name == t or name.endswith("." + t) for name in names)]
    return targets


def new_parameter_names(model: nn.Module) -> list[str]:
    """Names of the parameters the variant adds on top of a Llama-family source (e.g. the output gates)."""
    variant = get_variant(model.config.model_type)
    return [name for name, _ in model.named_parameters() if _matches_new(variant, name)]


def _matches_new(variant, name: str) -> bool:
    return any(re.search(pattern, name) for pattern in variant.new_parameter_patterns)
