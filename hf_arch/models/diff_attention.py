"""Variant ``hfa_diff_attention``: Grouped Differential Attention.

"Grouped Differential Attention": differential attention (a signal map minus λ times a noise map) with unequal head
groups — ``num_attention_heads`` signal heads and fewer ``diff_attn_noise_heads`` noise heads, each shared by a group
of signal heads — and growth by copying only signal heads (``hf-arch convert … --to diff_attention --grow-signal-heads
R``, exact). See ``layers/differential_attention.py``.
"""

from ..configuration import HfArchConfig
from .backbone import HfArchForCausalLM, HfArchForSequenceClassification, HfArchModel, HfArchPreTrainedModel


class DiffAttentionConfig(HfArchConfig):
    model_type = "hfa_diff_attention"

    @staticmethod
    def default_noise_heads(num_attention_heads: int) -> int:
        """The largest divisor of the head count that is at most half of it (a 2:1 or steeper signal:noise split).
        A method, not a module function: only the config class goes to the remote-code configuration file."""
        return max([d for d in range(1, num_attention_heads // 2 + 1) if num_attention_heads % d == 0], default=1)

    def __init__(self, diff_attn_noise_heads: int | None = None, num_attention_heads: int = 12, **kwargs):
        if diff_attn_noise_heads is None:
            diff_attn_noise_heads = self.default_noise_heads(num_attention_heads) if isinstance(num_attention_heads, int) else 1
        if diff_attn_noise_heads == 0:
            raise ValueError("DiffAttentionConfig.diff_attn_noise_heads must be >= 1 (with 0 noise heads the model is "
                             "plain attention)")
        super().__init__(diff_attn_noise_heads=diff_attn_noise_heads, num_attention_heads=num_attention_heads,
                         **kwargs)


class DiffAttentionPreTrainedModel(HfArchPreTrainedModel):
    config_class = DiffAttentionConfig


class DiffAttentionModel(DiffAttentionPreTrainedModel, HfArchModel):
    config_class = DiffAttentionConfig


class DiffAttentionForCausalLM(DiffAttentionPreTrainedModel, HfArchForCausalLM):
    config_class = DiffAttentionConfig
    model_class = DiffAttentionModel


class DiffAttentionForSequenceClassification(DiffAttentionPreTrainedModel, HfArchForSequenceClassification):
    config_class = DiffAttentionConfig
