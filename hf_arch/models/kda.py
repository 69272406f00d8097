"""Variant ``hfa_kda``: Kimi Delta Attention layers (Kimi Linear), alone or with softmax attention / MLA layers.

Kimi Team, "Kimi Linear: An Expressive, Efficient Attention Architecture" (arXiv 2510.26692): the gated delta rule
with a per-channel decay, ``S_t = (I − β_t k_t k_tᵀ) Diag(α_t) S_{t−1} + β_t k_t v_tᵀ``, ``o_t = S_tᵀ q_t``, with short
convs on q/k/v, a low-rank decay ``α_t = exp(−exp(A_log)·softplus(x W_a W_b + dt_bias))``, β = σ(x W_β) and a
low-rank sigmoid output gate into an RMSNorm (``layers/kimi_delta_attention.py``, options in
``config.mixer_options["kda"]``). Layers of type ``linear_attention`` are KDA unless ``token_mixer_types`` says
otherwise; ``full_attention_layers`` / ``linear_to_full_ratio`` keep softmax attention at chosen layers (what
``hf-arch convert --to kda --method mamba_init`` writes), and ``token_mixer_types`` builds Kimi Linear's own layout:
KDA : MLA at 3 : 1, with MoE channel mixers (``mlp_layer_types``).
"""

from ..configuration import HfArchConfig
from ..layers.kimi_delta_attention import KimiDeltaAttention  # registers the "kda" token mixer
from .backbone import HfArchForCausalLM, HfArchForSequenceClassification, HfArchModel, HfArchPreTrainedModel


class KDAConfig(HfArchConfig):
    model_type = "hfa_kda"
    default_layer_type = "linear_attention"
    default_token_mixers = {"linear_attention": "kda"}

    def __init__(self, **kwargs):  # its own __init__: transformers would otherwise generate a dataclass one
        super().__init__(**kwargs)


class KDAPreTrainedModel(HfArchPreTrainedModel):
    config_class = KDAConfig


class KDAModel(KDAPreTrainedModel, HfArchModel):
    config_class = KDAConfig


class KDAForCausalLM(KDAPreTrainedModel, HfArchForCausalLM):
    config_class = KDAConfig
    model_class = KDAModel


class KDAForSequenceClassification(KDAPreTrainedModel, HfArchForSequenceClassification):
    config_class = KDAConfig


__all__ = ["KDAConfig", "KDAForCausalLM", "KDAForSequenceClassification", "KDAModel", "KimiDeltaAttention"]
