"""Variant ``hfa_sa_softmax``: attention weights from Self-Adjust Softmax instead of softmax.

"Self-Adjust Softmax": ``x·softmax(x)``, or its normalised form ``(x − min(x_min,0)) / (max(0,x_max) −
min(x_min,0)) · softmax(x)``, so that gradients do not vanish when probabilities approach 0 or 1. Computed by
``kernels.ops.sa_softmax_attention`` (Triton forward and backward on CUDA, chunked PyTorch elsewhere).
"""

from ..configuration import HfArchConfig
from .backbone import HfArchForCausalLM, HfArchForSequenceClassification, HfArchModel, HfArchPreTrainedModel


class SASoftmaxConfig(HfArchConfig):
    model_type = "hfa_sa_softmax"

    def __init__(self, attn_score_function: str = "sa_softmax_normalized", **kwargs):
        if attn_score_function not in ("sa_softmax", "sa_softmax_normalized"):
            why = {"softmax": " (with 'softmax' the model is plain attention)",
                   "krr": " ('krr' is Cubit's kernel ridge regression: use CubitConfig, model_type hfa_cubit)"}
            raise ValueError("SASoftmaxConfig (hfa_sa_softmax).attn_score_function must be 'sa_softmax' or "
                             f"'sa_softmax_normalized', got {attn_score_function!r}{why.get(attn_score_function, '')}")
        super().__init__(attn_score_function=attn_score_function, **kwargs)


class SASoftmaxPreTrainedModel(HfArchPreTrainedModel):
    config_class = SASoftmaxConfig


class SASoftmaxModel(SASoftmaxPreTrainedModel, HfArchModel):
    config_class = SASoftmaxConfig


class SASoftmaxForCausalLM(SASoftmaxPreTrainedModel, HfArchForCausalLM):
    config_class = SASoftmaxConfig
    model_class = SASoftmaxModel


class SASoftmaxForSequenceClassification(SASoftmaxPreTrainedModel, HfArchForSequenceClassification):
    config_class = SASoftmaxConfig
