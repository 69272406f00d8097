"""hf-arch: architecture variants from recent papers as real 🤗 Transformers models.

``import hf_arch`` registers every variant with AutoConfig / AutoModel / AutoModelForCausalLM /
AutoModelForSequenceClassification, so ``AutoModelForCausalLM.from_pretrained(dir)`` just works.
"""

__version__ = "0.1.0"

from ._compat import check_transformers_version, ensure_kernels_subpackage

check_transformers_version()
ensure_kernels_subpackage()

from .configuration import HfArchConfig
from .models import (
    HybridConfig,
    HybridForCausalLM,
    HybridModel,
    GatedAttentionConfig,
    GatedAttentionForCausalLM,
    GatedAttentionForSequenceClassification,
    GatedAttentionModel,
    GatedDeltaNetConfig,
    GatedDeltaNetForCausalLM,
    GatedDeltaNetModel,
    GLAConfig,
    GLAForCausalLM,
    GLAModel,
    MoEConfig,
    MoEForCausalLM,
    MoEModel,
    SparseAttentionConfig,
    SparseAttentionForCausalLM,
    SparseAttentionModel,
    AffineAttentionConfig,
    AffineAttentionForCausalLM,
    AffineAttentionModel,
    SASoftmaxConfig,
    SASoftmaxForCausalLM,
    SASoftmaxModel,
    MoVEConfig,
    MoVEForCausalLM,
    MoVEModel,
    CubitConfig,
    CubitForCausalLM,
    CubitModel,
    DiffAttentionConfig,
    DiffAttentionForCausalLM,
    DiffAttentionModel,
    GeoNormConfig,
    GeoNormForCausalLM,
    GeoNormModel,
    SASConfig,
    SASForCausalLM,
    SASModel,
)
from .layers.attention import HfArchAttention
from .layers.mixer_registry import mixer_options, register_channel_mixer, register_token_mixer
from .layers.moe_routers import MoERouter, TopKRouter, register_moe_router
from .layers.moe_stats import disable_routing_stats, enable_routing_stats
from .peft_utils import lora_target_modules, lora_target_parameters, new_parameter_names
from .registry import VARIANTS, Variant, get_variant

__all__ = [
    "HfArchAttention",
    "HybridConfig",
    "HybridForCausalLM",
    "HybridModel",
    "mixer_options",
    "register_channel_mixer",
    "register_token_mixer",
    "MoERouter",
    "TopKRouter",
    "register_moe_router",
    "VARIANTS",
    "GatedAttentionConfig",
    "GatedAttentionForCausalLM",
    "GatedAttentionForSequenceClassification",
    "GatedAttentionModel",
    "GatedDeltaNetConfig",
    "GatedDeltaNetForCausalLM",
    "GatedDeltaNetModel",
    "GLAConfig",
    "GLAForCausalLM",
    "GLAModel",
    "HfArchConfig",
    "MoEConfig",
    "MoEForCausalLM",
    "MoEModel",
    "AffineAttentionConfig",
    "AffineAttentionForCausalLM",
    "AffineAttentionModel",
    "MoVEConfig",
    "MoVEForCausalLM",
    "MoVEModel",
    "CubitConfig",
    "CubitForCausalLM",
    "CubitModel",
    "DiffAttentionConfig",
    "DiffAttentionForCausalLM",
    "DiffAttentionModel",
    "GeoNormConfig",
    "GeoNormForCausalLM",
    "GeoNormModel",
    "SASConfig",
    "SASForCausalLM",
    "SASModel",
    "SASoftmaxConfig",
    "SASoftmaxForCausalLM",
    "SASoftmaxModel",
    "SparseAttentionConfig",
    "SparseAttentionForCausalLM",
    "SparseAttentionModel",
    "Variant",
    "__version__",
    "disable_routing_stats",
    "enable_routing_stats",
    "get_variant",
    "lora_target_modules",
    "lora_target_parameters",
    "new_parameter_names",
]
