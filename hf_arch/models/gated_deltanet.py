"""Variant ``hfa_gated_deltanet``: Gated DeltaNet layers (the linear layer of Qwen3-Next), alone or in hybrids.

Yang, Kautz & Hatamizadeh, "Gated Delta Networks: Improving Mamba2 with Delta Rule" (arXiv 2412.06464):
``S_t = α_t S_{t-1} + β_t k_t (v_t - α_t S_{t-1}ᵀ k_t)ᵀ`` with a per-head scalar decay
``α_t = exp(-exp(A_log)·softplus(x W_a + dt_bias))``, write strength ``β_t = σ(x W_b)``, L2-normalised q/k, a short
causal conv with SiLU on q/k/v and a gated RMSNorm on the output. Same hybrid options as ``hfa_gla``.
"""

from ..configuration import HfArchConfig
from .backbone import HfArchForCausalLM, HfArchForSequenceClassification, HfArchModel, HfArchPreTrainedModel


class GatedDeltaNetConfig(HfArchConfig):
    model_type = "hfa_gated_deltanet"
    default_layer_type = "linear_attention"

    def __init__(
        self,
        linear_attn_type: str = "gated_deltanet",
        linear_attn_conv_size: int = 4,
        linear_attn_qk_norm: str = "l2",
        **kwargs,
    ):
        if linear_attn_type != "gated_deltanet":
            raise ValueError(f"GatedDeltaNetConfig.linear_attn_type must be 'gated_deltanet', got {linear_attn_type!r} "
                             "(use GLAConfig for 'gla')")
        super().__init__(linear_attn_type=linear_attn_type, linear_attn_conv_size=linear_attn_conv_size,
                         linear_attn_qk_norm=linear_attn_qk_norm, **kwargs)


class GatedDeltaNetPreTrainedModel(HfArchPreTrainedModel):
    config_class = GatedDeltaNetConfig


class GatedDeltaNetModel(GatedDeltaNetPreTrainedModel, HfArchModel):
    config_class = GatedDeltaNetConfig


class GatedDeltaNetForCausalLM(GatedDeltaNetPreTrainedModel, HfArchForCausalLM):
    config_class = GatedDeltaNetConfig
    model_class = GatedDeltaNetModel


class GatedDeltaNetForSequenceClassification(GatedDeltaNetPreTrainedModel, HfArchForSequenceClassification):
    config_class = GatedDeltaNetConfig
