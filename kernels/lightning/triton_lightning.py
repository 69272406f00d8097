"""Lightning attention on our Triton GLA kernels (forward and backward): a fixed (or per-token) decay per head is a
GLA gate that is the same on every key channel, so ``g [B, T, H, K]`` is the decay broadcast over K and the GLA
kernels compute ``S_t = λ S_{t-1} + k_tᵀ v_t``, ``o_t = scale · q_t S_t`` exactly.

These kernels are token-serial (one program walks its sequence); on CUDA fla's chunked ``simple_gla`` is the default
where installed (``fla_backend``). Lightning's own chunked Triton split (intra-block quadratic, inter-block state) is
not written yet. Same contract as :func:`~.chunk.chunk_lightning_attention`; the decays take no gradient (fixed).
"""

from __future__ import annotations

from typing import Optional

import torch

from ..gla.triton_gla import triton_gla
from ._checks import check_lightning_inputs, decay_as_gla_gate

__all__ = ["triton_lightning_attention"]


def triton_lightning_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor,
    scale: Optional[float] = None,
    initial_state: Optional[torch.Tensor] = None,
    output_final_state: bool = False,
    cu_seqlens: Optional[torch.LongTensor] = None,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    check_lightning_inputs(q, k, v, log_decay, initial_state, cu_seqlens)
    g = decay_as_gla_gate(log_decay.detach(), q).to(torch.float32 if q.dtype != torch.float64 else q.dtype)
    return triton_gla(q, k, v, g.contiguous(), scale=scale, initial_state=initial_state,
                      output_final_state=output_final_state, cu_seqlens=cu_seqlens)
