"""hf-arch: architecture variants from recent papers as real 🤗 Transformers models.

``import hf_arch`` registers every variant with AutoConfig / AutoModel / AutoModelForCausalLM /
AutoModelForSequenceClassification, so ``AutoModelForCausalLM.from_pretrained(dir)`` just works.
"""

__version__ = "0.1.0"

from ._compat import check_transformers_version, ensure_kernels_subpackage

check_transformers_version()
ensure_kernels_subpackage()

from .configuration import AttentionFeatureSpec, AttentionScoreSpec, HfArchConfig
from . import models
from .models import *  # noqa: F401,F403  (every registered variant's Config / Model / ForCausalLM / …, models.__all__)
from .layers.attention import HfArchAttention
from .layers.attention_registry import AttentionFeature, AttentionScore, register_attention_feature
from .layers.attention_registry import register_attention_score
from .layers.mixer_registry import mixer_options, register_channel_mixer, register_token_mixer
from .layers.moe_routers import MoERouter, TopKRouter, register_moe_router
from .layers.moe_stats import disable_routing_stats, enable_routing_stats
from .hub_kernels import use_kernels
from .peft_utils import lora_target_modules, lora_target_parameters, new_parameter_names
from .registry import VARIANTS, Variant, get_variant

__all__ = [
    "AttentionFeature",
    "AttentionFeatureSpec",
    "AttentionScore",
    "AttentionScoreSpec",
    "HfArchAttention",
    "HfArchConfig",
    "MoERouter",
    "TopKRouter",
    "VARIANTS",
    "Variant",
    "__version__",
    "disable_routing_stats",
    "enable_routing_stats",
    "get_variant",
    "lora_target_modules",
    "lora_target_parameters",
    "mixer_options",
    "new_parameter_names",
    "register_attention_feature",
    "register_attention_score",
    "register_channel_mixer",
    "register_moe_router",
    "register_token_mixer",
    "use_kernels",
    *models.__all__,
]
