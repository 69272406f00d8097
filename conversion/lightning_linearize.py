"""``hf-arch convert SRC OUT --to lightning --method mamba_init``: a Llama-family model → Lightning attention layers.

As for Gated DeltaNet and KDA (Mamba-in-Llama's initialisation): each Lightning layer keeps the softmax layer's
``q/k/v/o_proj`` key for key (GQA key/value heads repeated to the query heads), its decays are TransNormerLLM's fixed
schedule (no parameters) and the output gate ``u_proj`` is new. Layers in ``keep_full_attention`` (or every
``(ratio + 1)``-th) keep the source's attention exactly; attention transfer and fine-tuning recover the rest.
"""

from __future__ import annotations

from ..layers.lightning_attention import LightningAttention
from ..models.lightning import LightningConfig, LightningForCausalLM
from .api import register_linearization
from .linearize import register_linear_target

register_linear_target("lightning", LightningConfig, LightningForCausalLM, {"mamba_init": lambda options: {}})
LIGHTNING_CONVERSION = register_linearization("lightning", "mamba_init", examples={
    "mamba_init": dict(method="mamba_init"),
    "mamba_init_hybrid": dict(method="mamba_init", ratio=1),
})

__all__ = ["LIGHTNING_CONVERSION", "LightningAttention"]
