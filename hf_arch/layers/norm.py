"""RMSNorm, computed in fp32 like Llama's so converted checkpoints match bit for bit in fp32."""

import torch
from torch import nn


class HfArchRMSNorm(nn.Module):
    """``weight_offset``: the scale is ``weight_offset + weight`` (Gemma's zero-centred ``(1 + w)``, weight 0 at
    init), computed in fp32 as Gemma does; 0 (Llama) keeps Llama's arithmetic."""

    def __init__(self, hidden_size: int, eps: float = 1e-6, weight_offset: float = 0.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.full((hidden_size,), 1.0 - weight_offset))
        self.variance_epsilon = eps
        self.weight_offset = weight_offset

    @torch.no_grad()
    def init_parameters(self, init) -> None:
        init.constant_(self.weight, 1.0 - self.weight_offset)  # the identity scale

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        if self.weight_offset:
            return (hidden_states * (self.weight_offset + self.weight.float())).to(input_dtype)
        return self.weight * hidden_states.to(input_dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


class HfArchGatedRMSNorm(HfArchRMSNorm):
    """``RMSNorm(x) · SiLU(gate)`` (fp32 math): the output norm of GLA / Gated DeltaNet layers, per head."""

    def forward(self, hidden_states: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor:
        normed = super().forward(hidden_states)
        if gate is None:
            return normed
        return (normed.float() * torch.nn.functional.silu(gate.float())).to(hidden_states.dtype)


class HfArchProjectionRMSNorm(HfArchRMSNorm):
    """RMSNorm over a whole projection, all heads at once (OLMo-2's q/k norm), on ``[..., heads, head_dim]``."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return super().forward(hidden_states.flatten(-2)).view(hidden_states.shape)


def build_qk_norms(config, num_heads: int, num_key_value_heads: int, head_dim: int):
    """``(q_norm, k_norm)`` for ``config.qk_norm`` (None, None when off): per head (``qk_norm_scope="head"``,
    Qwen3) or over the whole projection (``"projection"``, OLMo-2). Both take ``[B, T, heads, head_dim]``."""
    if not config.qk_norm:
        return None, None
    eps, offset = config.rms_norm_eps, getattr(config, "norm_weight_offset", 0.0)
    if getattr(config, "qk_norm_scope", "head") == "projection":
        return (HfArchProjectionRMSNorm(num_heads * head_dim, eps=eps, weight_offset=offset),
                HfArchProjectionRMSNorm(num_key_value_heads * head_dim, eps=eps, weight_offset=offset))
    return HfArchRMSNorm(head_dim, eps=eps, weight_offset=offset), HfArchRMSNorm(head_dim, eps=eps, weight_offset=offset)
