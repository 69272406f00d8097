"""Variant ``hfa_moe``: Mixture-of-Experts channel mixers on the shared backbone.

Every layer is sparse unless ``mlp_layer_types`` / ``moe_sparse_step`` say otherwise; attention layers are the
backbone's (so ``layer_types``, the output gate and linear attention combine with MoE). Presets bundle the papers'
choices; explicit arguments always win over a preset, and the saved config holds every field, so a checkpoint
never depends on what a preset meant when it was written:

- ``softmax_topk`` (default): softmax top-k router, renormalised over the k (Mixtral / Qwen-MoE baseline).
- ``qwen_moe``: plus one always-on shared expert with a sigmoid gate (Qwen2-MoE / DeepSeek-style).
- ``moe_plus_plus``: MoE++ (Jin et al., arXiv 2410.07348): 1 zero, 1 copy and 2 constant experts next to the FFN
  experts, and gating residuals between consecutive routers.
- ``unipool``: UniPool: one global pool of FFN experts shared by every sparse layer (half the per-layer budget,
  ``num_experts × sparse layers / 2``, unless ``moe_pool_size`` is given), a NormRouter per layer and a pool-level
  balance loss.
- ``sinkhorn``: Selective Sinkhorn Routing, which replaces the load-balance loss (coefficient 0).
- ``thor``: THOR's stochastic experts with consistency regularisation (no balance loss: routing is random).
- ``blockffn``: BlockFFN (Song et al., arXiv 2507.08771): ReLU + RMSNorm router (variable number of experts) with
  token- and chunk-level sparsity losses.
"""

from __future__ import annotations

from ..configuration import HfArchConfig
from .moe_presets import MOE_PRESETS, half_layerwise_pool_size
from .backbone import HfArchForCausalLM, HfArchForSequenceClassification, HfArchModel, HfArchPreTrainedModel

class MoEConfig(HfArchConfig):
    model_type = "hfa_moe"
    default_mlp_layer_type = "sparse"

    def __init__(self, moe_preset: str | None = None, **kwargs):
        if moe_preset is not None:
            if moe_preset not in MOE_PRESETS:
                raise ValueError(f"MoEConfig.moe_preset must be one of {sorted(MOE_PRESETS)}, got {moe_preset!r}")
            for field, value in MOE_PRESETS[moe_preset].items():
                kwargs.setdefault(field, value)
            if moe_preset == "unipool" and kwargs.get("moe_pool_size") is None:
                kwargs["moe_pool_size"] = half_layerwise_pool_size(kwargs)
        self.moe_preset = moe_preset
        super().__init__(**kwargs)


class MoEPreTrainedModel(HfArchPreTrainedModel):
    config_class = MoEConfig


class MoEModel(MoEPreTrainedModel, HfArchModel):
    config_class = MoEConfig


class MoEForCausalLM(MoEPreTrainedModel, HfArchForCausalLM):
    config_class = MoEConfig
    model_class = MoEModel


class MoEForSequenceClassification(MoEPreTrainedModel, HfArchForSequenceClassification):
    config_class = MoEConfig
