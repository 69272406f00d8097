"""Variant ``hfa_sparse_attention``: learned sparse attention inserted into a frozen pretrained model.

SeerAttention (Gao et al., arXiv 2410.13276): a block gate per attention layer, self-distilled from the layer's own
block-pooled attention map, picks the key blocks each query block computes. Flux Attention (Qiu et al., arXiv
2604.07394): a router per layer sends each input to full attention or a sink + sliding-window branch. Both leave
every pretrained weight untouched; only the gates / routers train.
"""

from ..configuration import HfArchConfig
from .backbone import HfArchForCausalLM, HfArchForSequenceClassification, HfArchModel, HfArchPreTrainedModel


class SparseAttentionConfig(HfArchConfig):
    model_type = "hfa_sparse_attention"

    def __init__(self, sparse_attn_method: str | None = "seer", **kwargs):
        if sparse_attn_method is None:
            raise ValueError("SparseAttentionConfig.sparse_attn_method must be 'seer' or 'flux' (without one the "
                             "model is plain softmax attention)")
        super().__init__(sparse_attn_method=sparse_attn_method, **kwargs)


class SparseAttentionPreTrainedModel(HfArchPreTrainedModel):
    config_class = SparseAttentionConfig


class SparseAttentionModel(SparseAttentionPreTrainedModel, HfArchModel):
    config_class = SparseAttentionConfig


class SparseAttentionForCausalLM(SparseAttentionPreTrainedModel, HfArchForCausalLM):
    config_class = SparseAttentionConfig
    model_class = SparseAttentionModel


class SparseAttentionForSequenceClassification(SparseAttentionPreTrainedModel, HfArchForSequenceClassification):
    config_class = SparseAttentionConfig
