"""Insertions that start at the identity: a Llama-family model → a variant whose new parameters leave the function
unchanged until training moves them. Every source weight is copied and checked.

- ``affine_attention``: per-head ``α(x)·softmax + β(x)`` with α = 1, β = 0 (a zero projection).
- ``move``: MoVE's value-embedding bank with every layer's mixing scale at 0.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from ..layers.affine_attention import AffineAttentionScale
from ..layers.value_bank import ValueBank, ValueGate
from ..models.affine_attention import AffineAttentionConfig, AffineAttentionForCausalLM
from ..models.move import MoVEConfig, MoVEForCausalLM
from ..peft_utils import new_parameter_names
from .sources import adapter_for
from .weights import check_copied, copy_source_weights

INITS = ("identity", "normal")
INSERTED_MODULES = (AffineAttentionScale, ValueBank, ValueGate)


def _check_init(init: str, target: str) -> None:
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS} for --to {target}, got {init!r}")


@dataclass
class AffineInsertionOptions:
    init: str = "identity"  # identity: α=1, β=0 exactly; normal: small random α−1, β as when training from scratch

    def config_overrides(self) -> dict:
        _check_init(self.init, "affine_attention")
        return {"attn_affine": True, "attn_affine_init": self.init}

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class ValueBankInsertionOptions:
    slots: int = 64  # value embeddings in the shared bank
    init: str = "identity"  # identity: every layer's mixing scale 0 (exact); normal: random scales

    def config_overrides(self) -> dict:
        _check_init(self.init, "move")
        if not isinstance(self.slots, int) or isinstance(self.slots, bool) or self.slots < 1:
            raise ValueError(f"slots must be an integer >= 1 for --to move (the bank's size), got {self.slots!r}")
        return {"move_num_slots": self.slots, "move_init": self.init}

    def as_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def _insert(source_model, config_class, model_class, overrides: dict):
    kwargs = adapter_for(source_model.config).backbone_kwargs(source_model.config)
    config = config_class(**kwargs, **overrides)
    config._attn_implementation = source_model.config._attn_implementation
    target = model_class(config).to(next(source_model.parameters()).dtype)
    source_state = source_model.state_dict()
    copy_source_weights(source_state, target.state_dict(), set(new_parameter_names(target)))
    for module in target.modules():  # explicit: never rely on load-time init for the new parameters
        if isinstance(module, INSERTED_MODULES):
            module.init_parameters()
    if config.tie_word_embeddings:
        target.tie_weights()
    check_copied(source_state, target.state_dict())
    target.generation_config = source_model.generation_config
    return target.eval()


def insert_affine_scale(source_model, options: AffineInsertionOptions | None = None) -> AffineAttentionForCausalLM:
    options = options or AffineInsertionOptions()
    return _insert(source_model, AffineAttentionConfig, AffineAttentionForCausalLM, options.config_overrides())


def insert_value_bank(source_model, options: ValueBankInsertionOptions | None = None) -> MoVEForCausalLM:
    options = options or ValueBankInsertionOptions()
    return _insert(source_model, MoVEConfig, MoVEForCausalLM, options.config_overrides())
