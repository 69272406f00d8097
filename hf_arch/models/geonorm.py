"""Variant ``hfa_geonorm``: GeoNorm's geodesic residual updates.

The hidden state stays on a sphere and each attention / FFN output moves it along a geodesic, with a layer-wise
update decay, instead of being added to it. See ``layers/geonorm.py``.
"""

from ..configuration import HfArchConfig
from .backbone import HfArchForCausalLM, HfArchForSequenceClassification, HfArchModel, HfArchPreTrainedModel


class GeoNormConfig(HfArchConfig):
    model_type = "hfa_geonorm"

    def __init__(self, residual_update: str = "geodesic", **kwargs):
        if residual_update != "geodesic":
            raise ValueError(f"GeoNormConfig.residual_update must be 'geodesic', got {residual_update!r}")
        super().__init__(residual_update=residual_update, **kwargs)


class GeoNormPreTrainedModel(HfArchPreTrainedModel):
    config_class = GeoNormConfig


class GeoNormModel(GeoNormPreTrainedModel, HfArchModel):
    config_class = GeoNormConfig


class GeoNormForCausalLM(GeoNormPreTrainedModel, HfArchForCausalLM):
    config_class = GeoNormConfig
    model_class = GeoNormModel


class GeoNormForSequenceClassification(GeoNormPreTrainedModel, HfArchForSequenceClassification):
    config_class = GeoNormConfig
