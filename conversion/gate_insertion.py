"""Gate insertion: a Llama-family model → ``hfa_gated_attention`` with every source weight copied.

The new output gates start at exactly 1 (``2·σ(0)`` with a zero projection and zero bias), so the converted model
computes the same function as its source; training then moves the gates away from identity.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


from ..layers.output_gate import AttentionOutputGate
from ..models.gated_attention import GatedAttentionConfig, GatedAttentionForCausalLM
from .sources import adapter_for, takes_source_families
from .weights import build_from_source

GATE_INITS = ("identity", "normal")


@dataclass
class GateInsertionOptions:
    granularity: str = "elementwise"  # headwise | elementwise
    gate_bias: bool = False
    gate_rank: int | None = None
    gate_init: str = "identity"  # identity: exactly 1 at init; normal: random σ-gate as when training from scratch
    gate_lr_scale: float = 1.0

    def config_overrides(self) -> dict:
        if self.gate_init not in GATE_INITS:
            raise ValueError(f"gate_init must be one of {GATE_INITS}, got {self.gate_init!r}")
        identity = self.gate_init == "identity"
        return {
            "attn_output_gate": self.granularity,
            "attn_output_gate_bias": self.gate_bias,
            "attn_output_gate_rank": self.gate_rank,
            "attn_output_gate_scale": 2.0 if identity else 1.0,
            "attn_output_gate_init": "zeros" if identity else "normal",
            "attn_output_gate_bias_init": 0.0,
            "attn_output_gate_lr_scale": self.gate_lr_scale,
        }

    def as_dict(self) -> dict:
        return asdict(self)


def gated_attention_config_from(source_config, options: GateInsertionOptions) -> GatedAttentionConfig:
    kwargs = adapter_for(source_config).backbone_kwargs(source_config)
    return GatedAttentionConfig(**kwargs, **options.config_overrides())


@takes_source_families
def insert_gates(source_model, options: GateInsertionOptions | None = None) -> GatedAttentionForCausalLM:
    """Build the gated model from an in-memory source model (same dtype), copying and checking every weight."""
    options = options or GateInsertionOptions()
    config = gated_attention_config_from(source_model.config, options)

    def init_new(target) -> None:
        for module in target.modules():
            if isinstance(module, AttentionOutputGate):
                module.reset_parameters(config.attn_output_gate_init, config.initializer_range,
                                        config.attn_output_gate_bias_init)

    return build_from_source(source_model, config, GatedAttentionForCausalLM, init_new)
