"""Variant ``hfa_sas``: Simulated Attention Score.

"SAS: Simulated Attention Score": attention over more and wider heads simulated from the real ones by small learned
maps, aggregated back by Parameter-Efficient Attention Aggregation so the parameter count barely moves. See
``layers/simulated_attention.py``.
"""

from ..configuration import HfArchConfig
from .backbone import HfArchForCausalLM, HfArchForSequenceClassification, HfArchModel, HfArchPreTrainedModel


class SASConfig(HfArchConfig):
    model_type = "hfa_sas"

    def __init__(self, sas_num_heads: int | None = None, num_attention_heads: int = 12, **kwargs):
        if sas_num_heads is None and isinstance(num_attention_heads, int):
            sas_num_heads = 2 * num_attention_heads
        if sas_num_heads == 0:
            raise ValueError("SASConfig.sas_num_heads must be >= num_attention_heads (0 turns simulation off)")
        super().__init__(sas_num_heads=sas_num_heads, num_attention_heads=num_attention_heads, **kwargs)


class SASPreTrainedModel(HfArchPreTrainedModel):
    config_class = SASConfig


class SASModel(SASPreTrainedModel, HfArchModel):
    config_class = SASConfig


class SASForCausalLM(SASPreTrainedModel, HfArchForCausalLM):
    config_class = SASConfig
    model_class = SASModel


class SASForSequenceClassification(SASPreTrainedModel, HfArchForSequenceClassification):
    config_class = SASConfig
