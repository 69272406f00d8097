"""Registered variants. Importing this module registers every variant with the transformers Auto classes."""

from ..registry import Variant, register_variant
from .backbone import HfArchForCausalLM, HfArchForSequenceClassification, HfArchModel, HfArchPreTrainedModel
from .gated_attention import (
    GatedAttentionConfig,
    GatedAttentionForCausalLM,
    GatedAttentionForSequenceClassification,
    GatedAttentionModel,
)

_ATTENTION_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

GATED_ATTENTION = register_variant(
    Variant(
        name="gated_attention",
        config_class=GatedAttentionConfig,
        model_class=GatedAttentionModel,
        causal_lm_class=GatedAttentionForCausalLM,
        sequence_classification_class=GatedAttentionForSequenceClassification,
        summary="softmax attention with a query-dependent sigmoid output gate (headwise or elementwise, G1)",
        paper="Qiu et al., Gated Attention for Large Language Models (arXiv 2505.06708)",
        lora_target_modules=_ATTENTION_LORA_TARGETS + ("output_gate.proj",),
        new_parameter_patterns=(r"\.output_gate\.",),
        tags=("gated-attention",),
    )
)

__all__ = [
    "GATED_ATTENTION",
    "GatedAttentionConfig",
    "GatedAttentionForCausalLM",
    "GatedAttentionForSequenceClassification",
    "GatedAttentionModel",
    "HfArchForCausalLM",
    "HfArchForSequenceClassification",
    "HfArchModel",
    "HfArchPreTrainedModel",
]
