"""Insertions that start at the identity: a Llama-family model → a variant whose new parameters leave the function
unchanged until training moves them. Every source weight is copied and checked.

- ``affine_attention``: per-head ``α(x)·softmax + β(x)`` with α = 1, β = 0 (a zero projection).
- ``move``: MoVE's value-embedding bank with every layer's mixing scale at 0.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..layers.affine_attention import AffineAttentionScale
from ..layers.value_bank import ValueBank, ValueGate
from ..models.affine_attention import AffineAttentionConfig, AffineAttentionForCausalLM
from ..models.move import MoVEConfig, MoVEForCausalLM
from .sources import adapter_for, takes_source_families
from .weights import build_from_source

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


def _insert(source_model, config_class, model_class, overrides: dict):
    kwargs = adapter_for(source_model.config).backbone_kwargs(source_model.config)

    def init_new(target) -> None:
        for module in target.modules():
            if isinstance(module, INSERTED_MODULES):
                module.init_parameters()

    return build_from_source(source_model, config_class(**kwargs, **overrides), model_class, init_new)


@takes_source_families
def insert_affine_scale(source_model, options: AffineInsertionOptions | None = None) -> AffineAttentionForCausalLM:
    options = options or AffineInsertionOptions()
    return _insert(source_model, AffineAttentionConfig, AffineAttentionForCausalLM, options.config_overrides())


@takes_source_families
def insert_value_bank(source_model, options: ValueBankInsertionOptions | None = None) -> MoVEForCausalLM:
    options = options or ValueBankInsertionOptions()
    return _insert(source_model, MoVEConfig, MoVEForCausalLM, options.config_overrides())
