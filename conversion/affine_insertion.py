"""Affine-scale insertion: a Llama-family model → ``hfa_affine_attention`` with every source weight copied.

The per-head scale and bias start at α = 1, β = 0 (a zero projection), so the converted model computes its source's
function exactly; training then lets the attention weights leave the simplex.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from ..layers.affine_attention import AffineAttentionScale
from ..models.affine_attention import AffineAttentionConfig, AffineAttentionForCausalLM
from ..peft_utils import new_parameter_names
from .sources import adapter_for
from .weights import check_copied, copy_source_weights

INITS = ("identity", "normal")


@dataclass
class AffineInsertionOptions:
    init: str = "identity"  # identity: α=1, β=0 exactly; normal: small random α−1, β as when training from scratch

    def config_overrides(self) -> dict:
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS} for --to affine_attention, got {self.init!r}")
        return {"attn_affine": True, "attn_affine_init": self.init}

    def as_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def insert_affine_scale(source_model, options: AffineInsertionOptions | None = None) -> AffineAttentionForCausalLM:
    options = options or AffineInsertionOptions()
    kwargs = adapter_for(source_model.config).backbone_kwargs(source_model.config)
    config = AffineAttentionConfig(**kwargs, **options.config_overrides())
    config._attn_implementation = source_model.config._attn_implementation
    target = AffineAttentionForCausalLM(config).to(next(source_model.parameters()).dtype)
    source_state = source_model.state_dict()
    copy_source_weights(source_state, target.state_dict(), set(new_parameter_names(target)))
    for module in target.modules():  # explicit: never rely on load-time init for the new parameters
        if isinstance(module, AffineAttentionScale):
            module.init_parameters()
    if config.tie_word_embeddings:
        target.tie_weights()
    check_copied(source_state, target.state_dict())
    target.generation_config = source_model.generation_config
    return target.eval()
