"""Variant ``hfa_lightning``: Lightning attention layers (TransNormerLLM), alone or with softmax attention layers.

Qin et al., "Scaling TransNormer to 175 Billion Parameters" (TransNormerLLM) and "Lightning Attention-2": linear
attention with a fixed exponential decay per head, LRPE relative positions, an SRMSNorm-normalised and gated output
(``layers/lightning_attention.py``, options in ``config.mixer_options["lightning"]``). Layers of type
``linear_attention`` are Lightning; ``full_attention_layers`` / ``linear_to_full_ratio`` keep softmax attention at
chosen layers (what ``hf-arch convert --to lightning --method mamba_init`` writes). TransNormerLLM's SGLU channel mixer
is the backbone's MLP with ``hidden_act="linear"``.
"""

from ..configuration import HfArchConfig
from ..layers.lightning_attention import LightningAttention  # registers the "lightning" token mixer
from .backbone import HfArchForCausalLM, HfArchForSequenceClassification, HfArchModel, HfArchPreTrainedModel


class LightningConfig(HfArchConfig):
    model_type = "hfa_lightning"
    default_layer_type = "linear_attention"
    default_token_mixers = {"linear_attention": "lightning"}

    def __init__(self, **kwargs):  # its own __init__: transformers would otherwise generate a dataclass one
        super().__init__(**kwargs)


class LightningPreTrainedModel(HfArchPreTrainedModel):
    config_class = LightningConfig


class LightningModel(LightningPreTrainedModel, HfArchModel):
    config_class = LightningConfig


class LightningForCausalLM(LightningPreTrainedModel, HfArchForCausalLM):
    config_class = LightningConfig
    model_class = LightningModel


class LightningForSequenceClassification(LightningPreTrainedModel, HfArchForSequenceClassification):
    config_class = LightningConfig


__all__ = ["LightningAttention", "LightningConfig", "LightningForCausalLM", "LightningForSequenceClassification",
           "LightningModel"]
