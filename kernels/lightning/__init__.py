"""Lightning attention (TransNormerLLM): linear attention with a fixed exponential decay per head.

Naive reference, chunked PyTorch (Lightning's intra-block / inter-block split) and a recurrent decode path; on CUDA
fla's ``simple_gla`` kernels (the scalar-decay form fla's own ``lightning_attn`` runs on) where fla is installed.
"""

from .chunk import chunk_lightning_attention, lightning_log_decay
from .naive import naive_lightning_attention
from .recurrent import fused_recurrent_lightning_attention

__all__ = ["chunk_lightning_attention", "fused_recurrent_lightning_attention", "lightning_log_decay",
           "naive_lightning_attention"]
