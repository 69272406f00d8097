"""Gated Linear Attention, fused recurrent form: the decode path (T small, e.g. T=1 with the cached state).

Same contract as :func:`naive_recurrent_gla`. Loops over T with three ops per step (decay-mul, rank-1 update,
readout matmul); gate exponentials and the query scale are applied once for the whole sequence.
"""

from __future__ import annotations

from typing import Optional

import torch

from ._checks import check_gla_inputs, compute_dtype, run_per_sequence

__all__ = ["fused_recurrent_gla"]


def _gla_recurrent_core(q, k, v, g, h0):
    # q, k, g: [B, T, H, Dk] (q already scaled); v: [B, T, H, Dv]; h0: [B, H, Dk, Dv] or None.
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    S = h0 if h0 is not None else q.new_zeros(B, H, Dk, Dv)
    alpha = g.exp().unsqueeze(-1)  # [B, T, H, Dk, 1]
    q_t, k_t, v_t, a_t = q.unsqueeze(-2).unbind(1), k.unsqueeze(-1).unbind(1), v.unsqueeze(-2).unbind(1), alpha.unbind(1)
    outs = []
    for t in range(T):
        S = torch.addcmul(S * a_t[t], k_t[t], v_t[t])  # Diag(alpha_t) S + k_t^T v_t
        outs.append(q_t[t] @ S)  # [B, H, 1, Dv]
    o = torch.stack(outs, 1).squeeze(-2)  # [B, T, H, Dv]
    return o, S


def fused_recurrent_gla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    scale: Optional[float] = None,
    initial_state: Optional[torch.Tensor] = None,
    output_final_state: bool = False,
    cu_seqlens: Optional[torch.LongTensor] = None,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Recurrent GLA; returns ``(o [B, T, H, D_v] in q's dtype, final_state [N, H, D_k, D_v] fp32 or None)``."""
    lengths = check_gla_inputs(q, k, v, g, initial_state, cu_seqlens)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    out_dtype = q.dtype
    dt = compute_dtype(q, k, v, g, initial_state)
    q = q.to(dt) * scale
    k, v, g = k.to(dt), v.to(dt), g.to(dt)
    h0 = initial_state.to(dt) if initial_state is not None else None
    o, S = run_per_sequence(_gla_recurrent_core, q, k, v, g, h0, cu_seqlens, lengths)
    return o.to(out_dtype), (S if output_final_state else None)
