"""Gated Linear Attention: the step-by-step fp32 reference (the spec).

Conventions (as in fla): q, k ``[B, T, H, D_k]``, v ``[B, T, H, D_v]``, g ``[B, T, H, D_k]`` the log-space forget
gate (values <= 0, alpha_t = exp(g_t)). Per head::

    S_t = Diag(alpha_t) S_{t-1} + k_t^T v_t        (S: [D_k, D_v], fp32)
    o_t = scale * q_t S_t                            (scale defaults to D_k ** -0.5)

``initial_state`` ``[N, H, D_k, D_v]``; N is the batch size, or the number of packed sequences when ``cu_seqlens``
(``[N+1]`` cumulative lengths, B == 1) is given. Every packed sequence starts from its own initial state (or zeros)
and no state crosses a boundary. Returns ``(o, final_state)`` with ``o`` in q's dtype and ``final_state`` fp32
(``None`` unless ``output_final_state``). Computation is fp32 (float64 if any input is float64).
"""

from __future__ import annotations

from typing import Optional

import torch

from ._checks import check_gla_inputs, compute_dtype

__all__ = ["naive_recurrent_gla"]


def naive_recurrent_gla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    scale: Optional[float] = None,
    initial_state: Optional[torch.Tensor] = None,
    output_final_state: bool = False,
    cu_seqlens: Optional[torch.LongTensor] = None,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    lengths = check_gla_inputs(q, k, v, g, initial_state, cu_seqlens)
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    if scale is None:
        scale = Dk**-0.5
    out_dtype = q.dtype
    dt = compute_dtype(q, k, v, g, initial_state)
    q, k, v, g = (x.to(dt) for x in (q, k, v, g))

    # Sequences: (batch row, start, length); with cu_seqlens all of them live in batch row 0.
    if cu_seqlens is None:
        seqs = [(b, 0, T) for b in range(B)]
    else:
        starts = cu_seqlens.tolist()[:-1]
        seqs = [(0, s, n) for s, n in zip(starts, lengths)]

    outputs, finals = [], []
    for n, (b, start, length) in enumerate(seqs):
        S = initial_state[n].to(dt) if initial_state is not None else q.new_zeros(H, Dk, Dv)
        for t in range(start, start + length):
            S = torch.exp(g[b, t])[:, :, None] * S + k[b, t][:, :, None] * v[b, t][:, None, :]
            outputs.append(scale * torch.einsum("hk,hkv->hv", q[b, t], S))
        finals.append(S)
    if outputs:
        o = torch.stack(outputs, 0).reshape(B, T, H, Dv)  # sequences are laid out row-major in (B, T)
    else:
        o = q.new_zeros(B, T, H, Dv)
    final_state = torch.stack(finals, 0) if output_final_state else None
    return o.to(out_dtype), final_state
