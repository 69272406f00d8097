"""RMSNorm, computed in fp32 like Llama's so converted checkpoints match bit for bit in fp32."""

import torch
from torch import nn


class HfArchRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
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
