"""``hf-arch convert SRC OUT --to kda --method mamba_init``: a Llama-family model → Kimi Delta Attention layers.

Mamba-in-Llama's initialisation (Wang et al., arXiv 2408.15237), as for Gated DeltaNet: each KDA layer keeps the
softmax layer's ``q/k/v/o_proj`` key for key (q → C, k → B, v → x, o → out; GQA key/value heads repeated after the
conv), and everything KDA adds — the short conv, the low-rank per-channel decay with ``A_log`` / ``dt_bias``, β, the
low-rank output gate and its RMSNorm — starts from its standard initialisation (``KimiDeltaAttention.init_parameters``).
Layers in ``keep_full_attention`` (or every ``(ratio + 1)``-th) keep the source's attention exactly. The recovery
recipes (attention transfer, then fine-tuning or distillation) run on the result as on any linearized model.
"""

from __future__ import annotations

from ..layers.kimi_delta_attention import KimiDeltaAttention
from ..models.kda import KDAConfig, KDAForCausalLM
from .api import register_linearization
from .linearize import register_linear_target

# Mamba-in-Llama's q/k/v/o mapping needs no config field beyond the layer layout: KDA's own options keep their
# Kimi defaults (conv 4, decay and gate ranks = head_dim, q/k L2 norm, sigmoid gate).
register_linear_target("kda", KDAConfig, KDAForCausalLM, {"mamba_init": lambda options: {}})
KDA_CONVERSION = register_linearization("kda", "mamba_init", examples={
    "mamba_init": dict(method="mamba_init"),
    "mamba_init_hybrid": dict(method="mamba_init", ratio=1),  # every other layer keeps softmax attention
})

__all__ = ["KDA_CONVERSION", "KimiDeltaAttention"]
