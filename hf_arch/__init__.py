"""hf-arch: architecture variants from recent papers as real 🤗 Transformers models.

``import hf_arch`` registers every variant with AutoConfig / AutoModel / AutoModelForCausalLM /
AutoModelForSequenceClassification, so ``AutoModelForCausalLM.from_pretrained(dir)`` just works.
"""

__version__ = "0.1.0"

from .configuration import HfArchConfig
from .models import (
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
)
from .peft_utils import lora_target_modules, new_parameter_names
from .registry import VARIANTS, Variant, get_variant

__all__ = [
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
    "Variant",
    "__version__",
    "get_variant",
    "lora_target_modules",
    "new_parameter_names",
]
