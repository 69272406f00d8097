"""Variant ``hfa_move``: MoVE, a mixture of value embeddings shared by every attention layer.

"MoVE: Mixture of Value Embeddings — A New Axis for Scaling Parametric Memory in Autoregressive Models": a global
bank of learned value embeddings, mixed into each layer's values by a soft gate, so parametric memory grows with the
slot count rather than depth. The bank lives once at ``model.value_bank`` (see ``layers/value_bank.py``).
"""

from ..configuration import HfArchConfig
from .backbone import HfArchForCausalLM, HfArchForSequenceClassification, HfArchModel, HfArchPreTrainedModel


class MoVEConfig(HfArchConfig):
    model_type = "hfa_move"

    def __init__(self, move_num_slots: int = 64, **kwargs):
        if isinstance(move_num_slots, int) and not isinstance(move_num_slots, bool) and move_num_slots < 1:
            raise ValueError(f"MoVEConfig.move_num_slots must be >= 1 (a MoVE bank of size {move_num_slots} holds "
                             "nothing), got " + repr(move_num_slots))
        super().__init__(move_num_slots=move_num_slots, **kwargs)


class MoVEPreTrainedModel(HfArchPreTrainedModel):
    config_class = MoVEConfig


class MoVEModel(MoVEPreTrainedModel, HfArchModel):
    config_class = MoVEConfig


class MoVEForCausalLM(MoVEPreTrainedModel, HfArchForCausalLM):
    config_class = MoVEConfig
    model_class = MoVEModel


class MoVEForSequenceClassification(MoVEPreTrainedModel, HfArchForSequenceClassification):
    config_class = MoVEConfig
