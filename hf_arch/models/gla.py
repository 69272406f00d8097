"""Variant ``hfa_gla``: Gated Linear Attention layers, alone or in hybrids with softmax attention.

Yang et al., "Gated Linear Attention Transformers with Hardware-Efficient Training" (arXiv 2312.06635):
``S_t = Diag(α_t) S_{t-1} + k_tᵀ v_t``, ``o_t = q_t S_t`` with a data-dependent per-key-channel forget gate
``α_t = σ(x W_1 W_2 + b)^{1/τ}``, and a gated RMSNorm on the output. Hybrids: full/sliding attention at chosen
layers (``full_attention_layers``, ``linear_to_full_ratio`` or ``layer_types``), and inside a layer Liger's
``0.5·GLA + 0.5·SWA``, Lizard's ``GLA + α·SWA-with-sinks`` or LoLCATs' window softmax and linear attention over
the older keys sharing one denominator (``linear_attn_hybrid``).
"""

from ..configuration import HfArchConfig
from .backbone import HfArchForCausalLM, HfArchForSequenceClassification, HfArchModel, HfArchPreTrainedModel


class GLAConfig(HfArchConfig):
    model_type = "hfa_gla"
    default_layer_type = "linear_attention"

    def __init__(self, linear_attn_type: str = "gla", **kwargs):
        if linear_attn_type != "gla":
            raise ValueError(f"GLAConfig.linear_attn_type must be 'gla', got {linear_attn_type!r} "
                             "(use GatedDeltaNetConfig for 'gated_deltanet')")
        super().__init__(linear_attn_type=linear_attn_type, **kwargs)


class GLAPreTrainedModel(HfArchPreTrainedModel):
    config_class = GLAConfig


class GLAModel(GLAPreTrainedModel, HfArchModel):
    config_class = GLAConfig


class GLAForCausalLM(GLAPreTrainedModel, HfArchForCausalLM):
    config_class = GLAConfig
    model_class = GLAModel


class GLAForSequenceClassification(GLAPreTrainedModel, HfArchForSequenceClassification):
    config_class = GLAConfig
