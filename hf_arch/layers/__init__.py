"""Token mixers and channel mixers of the backbone. Each reads its own slice of the config."""

from .attention import HfArchAttention
from .mlp import HfArchMLP
from .norm import HfArchRMSNorm
from .output_gate import AttentionOutputGate
from .rope import HfArchRotaryEmbedding

__all__ = ["AttentionOutputGate", "HfArchAttention", "HfArchMLP", "HfArchRMSNorm", "HfArchRotaryEmbedding"]
