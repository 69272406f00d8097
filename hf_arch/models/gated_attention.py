"""Variant ``hfa_gated_attention``: softmax attention with a head-specific, query-dependent sigmoid output gate.

Qiu et al., "Gated Attention for Large Language Models: Non-linearity, Sparsity, and Attention-Sink-Free" (2025).
The gate sits after SDPA and before ``o_proj`` (position G1), is computed from the layer's normed input, and comes
headwise (one scalar per head) or elementwise (one per channel).
"""

from ..configuration import HfArchConfig
from .backbone import HfArchForCausalLM, HfArchForSequenceClassification, HfArchModel, HfArchPreTrainedModel


class GatedAttentionConfig(HfArchConfig):
    model_type = "hfa_gated_attention"

    def __init__(self, attn_output_gate: str | None = "elementwise", **kwargs):
        if attn_output_gate is None:
            raise ValueError(
                "GatedAttentionConfig.attn_output_gate must be 'headwise' or 'elementwise' (a gated-attention model "
                "without a gate is a plain Llama)"
            )
        super().__init__(attn_output_gate=attn_output_gate, **kwargs)


class GatedAttentionPreTrainedModel(HfArchPreTrainedModel):
    config_class = GatedAttentionConfig


class GatedAttentionModel(GatedAttentionPreTrainedModel, HfArchModel):
    config_class = GatedAttentionConfig


class GatedAttentionForCausalLM(GatedAttentionPreTrainedModel, HfArchForCausalLM):
    config_class = GatedAttentionConfig
    model_class = GatedAttentionModel


class GatedAttentionForSequenceClassification(GatedAttentionPreTrainedModel, HfArchForSequenceClassification):
    config_class = GatedAttentionConfig
