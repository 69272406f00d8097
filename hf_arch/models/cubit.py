"""Variant ``hfa_cubit``: attention as kernel ridge regression (Cubit).

Softmax attention is Nadaraya–Watson regression; Cubit replaces it with the closed-form kernel ridge regression
``O = κ(Q,K)(κ(K,K) + λI)⁻¹ V`` over each query's causal prefix, with Limited-Range Rescale of the values. Computed
by ``kernels.ops.krr_attention`` (PyTorch: a batched Cholesky factorisation, O(T³) per head, no Triton kernel).
"""

from ..configuration import HfArchConfig
from .backbone import HfArchForCausalLM, HfArchForSequenceClassification, HfArchModel, HfArchPreTrainedModel


class CubitConfig(HfArchConfig):
    model_type = "hfa_cubit"

    def __init__(self, attn_score_function: str = "krr", **kwargs):
        if attn_score_function != "krr":
            raise ValueError(f"CubitConfig.attn_score_function must be 'krr', got {attn_score_function!r}")
        super().__init__(attn_score_function=attn_score_function, **kwargs)


class CubitPreTrainedModel(HfArchPreTrainedModel):
    config_class = CubitConfig


class CubitModel(CubitPreTrainedModel, HfArchModel):
    config_class = CubitConfig


class CubitForCausalLM(CubitPreTrainedModel, HfArchForCausalLM):
    config_class = CubitConfig
    model_class = CubitModel


class CubitForSequenceClassification(CubitPreTrainedModel, HfArchForSequenceClassification):
    config_class = CubitConfig
