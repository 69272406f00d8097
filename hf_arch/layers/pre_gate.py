"""Read-ME's pre-gating router: one small network, decoupled from the layers, that maps each token's embedding to
every sparse layer's expert logits before the backbone runs.

    embedding ─ RMSNorm ─ Linear(H, h) ─ SiLU ─ Linear(h, S·E) ─ [B, T, S, E] logits   (S sparse layers, E experts)

Because the plan depends on the token's embedding alone, a token's experts in every layer are known as soon as the
token is: the model's ``plan_experts`` returns them (for prefetching experts, or batching requests by the experts they need),
and decoding needs no state for it. Read-ME's router also reads earlier tokens (a small Transformer over the
prefix); ours reads the token only, which keeps the plan cache-free.
"""

from __future__ import annotations

import torch
from torch import nn

from .norm import HfArchRMSNorm

__all__ = ["ReadMePreGate"]


class ReadMePreGate(nn.Module):
    new_parameters = ("*",)  # read by peft_utils: nothing here comes from a dense source

    def __init__(self, config) -> None:
        super().__init__()
        self.sparse_layers = [i for i, kind in enumerate(config.mlp_layer_types) if kind == "sparse"]
        self.num_experts = config.num_routed_experts
        self.top_k = config.num_experts_per_tok
        self.norm = HfArchRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.up = nn.Linear(config.hidden_size, config.moe_pre_gate_hidden, bias=False)
        self.out = nn.Linear(config.moe_pre_gate_hidden, len(self.sparse_layers) * self.num_experts, bias=False)
        self.act = nn.SiLU()

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        """``embeddings [B, T, H]`` -> logits ``[B, T, S, E]`` (fp32 or wider), one slice per sparse layer."""
        hidden = self.act(self.up(self.norm(embeddings)))
        logits = self.out(hidden)
        B, T = embeddings.shape[:2]
        return logits.view(B, T, len(self.sparse_layers), self.num_experts).to(
            torch.promote_types(logits.dtype, torch.float32))
