"""Which parameters to adapt: LoRA targets, and the parameters a conversion added.

Both come from the modules a model actually has, not from its ``model_type``, so a composed config (a gated-attention
model with differential noise heads, a diff-attention model with an output gate, GDN + MoE, …) gets the union of what
its modules contribute. Every layer module class declares, relative to itself:

- ``lora_targets``: ``nn.Linear`` children worth a LoRA adapter (``peft.LoraConfig(target_modules=...)`` suffixes);
- ``lora_target_parameters``: 3-D weights peft reaches through ``LoraConfig(target_parameters=...)`` (MoE experts);
- ``new_parameters``: parameters a Llama-family checkpoint does not have (a parameter, or a child module's name for
  all of its parameters; ``"*"``: all of the module's own);
- ``lora_targets_qualified = True`` when its names are generic (``proj``): the reported names then carry the module's
  attribute name (``output_gate.proj``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from .registry import variant_of

ALL_PARAMETERS = "*"


def lora_target_modules(model_or_config, include_new: bool = True) -> list[str]:
    """Module-name suffixes for ``peft.LoraConfig(target_modules=...)`` that cover the model's projections.

    Only names that exist in the model (as ``nn.Linear``) are returned, so peft is never handed a target that silently
    matches nothing. A config is read through the model it builds (on the meta device). ``include_new=False`` leaves
    out projections that are new parameters (e.g. the output gate).
    """
    metadata = _metadata(model_or_config)
    return [name for name, modules in metadata.lora_modules.items()
            if include_new or not all(metadata.is_new_module(m) for m in modules)]


def lora_target_parameters(model_or_config) -> list[str]:
    """Parameter-name suffixes for ``peft.LoraConfig(target_parameters=...)``: the model's 3-D expert weights (MoE).
    Only names that exist are returned; a config is read through the model it builds."""
    return list(_metadata(model_or_config).lora_parameters)


def new_parameter_names(model_or_config) -> list[str]:
    """Names of the parameters the model adds on top of a Llama-family source (e.g. the output gates), in
    ``named_parameters`` order. A config is read through the model it builds (``…ForCausalLM`` names)."""
    metadata = _metadata(model_or_config)
    return [name for name in metadata.parameter_names if name in metadata.new]


@dataclass
class _Metadata:
    parameter_names: list[str]
    lora_modules: dict[str, list[str]] = field(default_factory=dict)  # reported suffix -> full module names
    lora_parameters: dict[str, list[str]] = field(default_factory=dict)  # reported suffix -> full parameter names
    new: set[str] = field(default_factory=set)
    module_parameters: dict[str, list[str]] = field(default_factory=dict)  # full module name -> its parameters

    def is_new_module(self, module_name: str) -> bool:
        return all(name in self.new for name in self.module_parameters[module_name])


def _metadata(model_or_config) -> _Metadata:
    variant_of(model_or_config)  # an hf_arch model or config, or a KeyError naming the known variants
    model = model_or_config if isinstance(model_or_config, nn.Module) else _model_on_meta(model_or_config)
    metadata = _Metadata(parameter_names=[name for name, _ in model.named_parameters()])
    for name, module in model.named_modules():
        cls = type(module)
        prefix = f"{name}." if name else ""
        qualifier = name.rsplit(".", 1)[-1] + "." if name and getattr(cls, "lora_targets_qualified", False) else ""
        for relative in getattr(cls, "lora_targets", ()):
            target = _child(module, relative)
            if isinstance(target, nn.Linear):
                metadata.lora_modules.setdefault(qualifier + relative, []).append(prefix + relative)
                metadata.module_parameters[prefix + relative] = [
                    prefix + relative + "." + p for p, _ in target.named_parameters()]
        for relative in getattr(cls, "lora_target_parameters", ()):
            if isinstance(_child(module, relative), nn.Parameter):
                metadata.lora_parameters.setdefault(qualifier + relative, []).append(prefix + relative)
        declared = getattr(cls, "new_parameters", ())
        if declared:
            for relative, _ in module.named_parameters():
                if ALL_PARAMETERS in declared or any(relative == d or relative.startswith(d + ".") for d in declared):
                    metadata.new.add(prefix + relative)
    return metadata


def _child(module: nn.Module, dotted: str):
    """``module.a.b`` or None where a link is missing (an optional part left as None)."""
    for part in dotted.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


def _model_on_meta(config) -> nn.Module:
    """The causal LM a config builds, on the meta device (no memory, no init): its modules are the metadata."""
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(config)
    config._attn_implementation = "eager"  # metadata only: no attention backend is checked or loaded
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)
