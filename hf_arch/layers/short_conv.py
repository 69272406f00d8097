"""Depthwise causal short convolution with SiLU (the q/k/v conv of Gated DeltaNet-style layers).

One grouped ``conv1d`` call for plain batches; packed sequences are computed tap by tap (``kernel_size`` is 2-4)
so that they are cut exactly: a tap that would reach before the start of its sequence reads zero, as it would with
each sequence run on its own. With a cache, the
inputs of the last ``kernel_size`` tokens live in transformers' ``LinearAttentionLayer`` conv state; under sequence
parallelism (LASP-2, ``kernels.lasp2``) they come from the previous rank's chunk.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..kernels.lasp2 import active_plan, previous_rank_tail


class ShortConvolution(nn.Module):
    new_parameters = ("*",)  # read by peft_utils: a Llama layer has no conv

    def __init__(self, channels: int, kernel_size: int) -> None:
        super().__init__()
        self.kernel_size = kernel_size
        self.weight = nn.Parameter(torch.empty(channels, kernel_size))  # tap kernel_size-1 multiplies x_t

    @torch.no_grad()
    def init_parameters(self, init) -> None:
        bound = 1 / math.sqrt(self.kernel_size)  # nn.Conv1d's default for a depthwise kernel
        init.uniform_(self.weight, -bound, bound)

    def forward(
        self,
        x: torch.Tensor,
        past_inputs: torch.Tensor | None = None,
        position_in_sequence: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x ``[B, T, C]``; past_inputs ``[B, C, >= K-1]`` (the previous tokens' inputs) or None (zeros);
        position_in_sequence ``[B | 1, T]`` index of each token in its packed sequence (taps stop at its start)."""
        K = self.kernel_size
        T = x.shape[1]
        plan = active_plan()
        if plan is not None and past_inputs is None and K > 1:  # sequence parallel: the previous chunk's last inputs
            if position_in_sequence is not None:
                raise ValueError("ShortConvolution under sequence parallelism: packed sequences are not supported")
            past_inputs = previous_rank_tail(x, K - 1, plan).transpose(1, 2)
        if position_in_sequence is None:  # one depthwise conv1d call, or for one token a multiply-add
            x_cf = x.transpose(1, 2)  # [B, C, T]
            if past_inputs is not None:
                context = past_inputs[..., past_inputs.shape[-1] - (K - 1):].to(x.dtype)
            else:
                context = x_cf.new_zeros(x_cf.shape[0], x_cf.shape[1], K - 1)
            padded = torch.cat([context, x_cf], dim=-1)  # [B, C, K-1+T]
            weight = self.weight.to(x.dtype)
            if T == 1:  # decoding: one multiply-add over the K taps (a grouped conv1d costs ~0.1 ms to set up)
                return nn.functional.silu((padded * weight).sum(-1))[:, None]
            out = nn.functional.conv1d(padded, weight[:, None, :], groups=weight.shape[0])
            return nn.functional.silu(out.transpose(1, 2))
        if past_inputs is not None:
            context = past_inputs[..., past_inputs.shape[-1] - (K - 1):].transpose(1, 2).to(x.dtype)
        else:
            context = x.new_zeros(x.shape[0], K - 1, x.shape[2])
        padded = torch.cat([context, x], dim=1)  # [B, K-1+T, C]
        out = padded[:, K - 1:] * self.weight[:, K - 1]
        for lag in range(1, K):
            tap = padded[:, K - 1 - lag: K - 1 - lag + T] * self.weight[:, K - 1 - lag]
            if position_in_sequence is not None:
                tap = tap * (position_in_sequence >= lag).unsqueeze(-1).to(tap.dtype)
            out = out + tap
        return nn.functional.silu(out)

    def extra_repr(self) -> str:
        return f"channels={self.weight.shape[0]}, kernel_size={self.kernel_size}"
