"""Grouped expert SwiGLU MLP: the obviously-correct fp32 reference (the spec).

Assignment ``a`` applies expert ``e = expert_idx[a]`` to token ``x[token_idx[a]]``::

    gate, up = (x_t @ gate_up[e].T).chunk(2, -1)      # gate_up [E, 2I, H]: gate rows first, then up rows
    y[a]     = (silu(gate) * up) @ down[e].T          # down [E, H, I]

``y`` is ``[A, H]`` in assignment order (the caller weights it and scatters it into tokens). Computation is fp32
(float64 if any input is float64); the result has x's dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["naive_expert_mlp"]


def naive_expert_mlp(
    x: torch.Tensor,
    token_idx: torch.LongTensor,
    expert_idx: torch.LongTensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
) -> torch.Tensor:
    dt = torch.float64 if torch.float64 in (x.dtype, gate_up.dtype, down.dtype) else torch.float32
    xs = x.to(dt)[token_idx]
    y = xs.new_zeros(token_idx.shape[0], down.shape[1])
    for e in range(gate_up.shape[0]):
        mask = (expert_idx == e)[:, None]
        gate, up = (xs @ gate_up[e].to(dt).T).chunk(2, -1)
        y = y + mask * ((F.silu(gate) * up) @ down[e].to(dt).T)  # every row computed, only this expert's kept
    return y.to(x.dtype)
