"""Variant ``hfa_affine_attention``: affine-scaled attention, ``(α(x)·softmax(QKᵀ/√d) + β(x)) V``.

"Affine-Scaled Attention: Towards Flexible and Stable Transformer Attention": an input-dependent scale and
bias per head and query lift the sum-to-one constraint of the attention weights. α = 1, β = 0 is plain attention,
so the scale inserts exactly into a pretrained checkpoint (``hf-arch convert --to affine_attention``).
"""

from ..configuration import HfArchConfig
from .backbone import HfArchForCausalLM, HfArchForSequenceClassification, HfArchModel, HfArchPreTrainedModel


class AffineAttentionConfig(HfArchConfig):
    model_type = "hfa_affine_attention"

    def __init__(self, attn_affine: bool = True, **kwargs):
        if not attn_affine:
            raise ValueError("AffineAttentionConfig.attn_affine must be True (without it the model is plain attention)")
        super().__init__(attn_affine=attn_affine, **kwargs)


class AffineAttentionPreTrainedModel(HfArchPreTrainedModel):
    config_class = AffineAttentionConfig


class AffineAttentionModel(AffineAttentionPreTrainedModel, HfArchModel):
    config_class = AffineAttentionConfig


class AffineAttentionForCausalLM(AffineAttentionPreTrainedModel, HfArchForCausalLM):
    config_class = AffineAttentionConfig
    model_class = AffineAttentionModel


class AffineAttentionForSequenceClassification(AffineAttentionPreTrainedModel, HfArchForSequenceClassification):
    config_class = AffineAttentionConfig
