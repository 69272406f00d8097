"""Variant ``hfa_hybrid``: any per-layer layout of registered token and channel mixers.

``token_mixer_types`` names each layer's token mixer (``attention``, ``gla``, ``gated_deltanet``, ``mla``, ``kda``, …,
or one another package registered with ``register_token_mixer``), ``mlp_layer_types`` each layer's channel
mixer (``dense``, ``sparse``, ``acm``, ``versatile``, …), and ``mixer_options`` the options of mixers that keep theirs grouped; the layer types
(cache and mask kinds) follow from the mixers. The other variants are this backbone with one mechanism's defaults.
"""

from ..configuration import HfArchConfig
from ..layers.acm import AdaptiveComputationModule  # noqa: F401  (registers the "acm" channel mixer)
from ..layers.delta_attention import DeltaAttention  # noqa: F401  (registers the "delta" token mixer)
from ..layers.versatile_ffn import VersatileFFN  # noqa: F401  (registers the "versatile" channel mixer)
from .backbone import HfArchForCausalLM, HfArchForSequenceClassification, HfArchModel, HfArchPreTrainedModel


class HybridConfig(HfArchConfig):
    model_type = "hfa_hybrid"

    def __init__(self, **kwargs):  # its own __init__: transformers would otherwise generate a dataclass one
        super().__init__(**kwargs)


class HybridPreTrainedModel(HfArchPreTrainedModel):
    config_class = HybridConfig


class HybridModel(HybridPreTrainedModel, HfArchModel):
    config_class = HybridConfig


class HybridForCausalLM(HybridPreTrainedModel, HfArchForCausalLM):
    config_class = HybridConfig
    model_class = HybridModel


class HybridForSequenceClassification(HybridPreTrainedModel, HfArchForSequenceClassification):
    config_class = HybridConfig
