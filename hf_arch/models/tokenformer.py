"""Variant ``hfa_tokenformer``: TokenFormer (Wang et al., "TokenFormer: Rethinking Transformer Scaling with Tokenized
Model Parameters"). Every linear projection of the blocks — q, k, v, output and the feed-forward block — is
token-parameter attention (``layers/pattention.py``); embeddings, norms and the LM head stay as they are. The model
grows by adding key / value parameter tokens with the function unchanged (``hf-arch convert TOKENFORMER OUT --to
tokenformer --grow N``, ``conversion/tokenformer_growth.py``), then training continues. Token counts in
``config.mixer_options["pattention"]``.
"""

from ..configuration import HfArchConfig
from ..layers.pattention import PattentionAttention  # registers the "pattention" token and channel mixers
from .backbone import HfArchForCausalLM, HfArchForSequenceClassification, HfArchModel, HfArchPreTrainedModel


class TokenFormerConfig(HfArchConfig):
    model_type = "hfa_tokenformer"
    default_token_mixers = {"full_attention": "pattention"}

    def __init__(self, **kwargs):  # its own __init__: transformers would otherwise generate a dataclass one
        if kwargs.get("channel_mixer_types") is None:
            layers = kwargs.get("num_hidden_layers", HfArchConfig().num_hidden_layers)
            kwargs["channel_mixer_types"] = ["pattention"] * layers
        super().__init__(**kwargs)


class TokenFormerPreTrainedModel(HfArchPreTrainedModel):
    config_class = TokenFormerConfig


class TokenFormerModel(TokenFormerPreTrainedModel, HfArchModel):
    config_class = TokenFormerConfig


class TokenFormerForCausalLM(TokenFormerPreTrainedModel, HfArchForCausalLM):
    config_class = TokenFormerConfig
    model_class = TokenFormerModel


class TokenFormerForSequenceClassification(TokenFormerPreTrainedModel, HfArchForSequenceClassification):
    config_class = TokenFormerConfig


__all__ = ["PattentionAttention", "TokenFormerConfig", "TokenFormerForCausalLM",
           "TokenFormerForSequenceClassification", "TokenFormerModel"]
