"""Lightning attention for decoding (a few tokens on a cached state): one decay, one rank-1 update and one readout
per token on ``[B·H]`` views."""

from __future__ import annotations

import torch

from ._checks import check_lightning_inputs, prepare_lightning_inputs, run_lightning_sequences

__all__ = ["fused_recurrent_lightning_attention"]


def _recurrent_lightning_core(q, k, v, g, h0):
    B, T, H, K = q.shape
    V = v.shape[-1]
    S = (q.new_zeros(B, H, K, V) if h0 is None else h0).reshape(B * H, K, V)
    heads_first = lambda x: x.transpose(1, 2).reshape(B * H, T, x.shape[-1])  # noqa: E731
    q_rows, k_cols, v_rows = heads_first(q).unsqueeze(2), heads_first(k).unsqueeze(3), heads_first(v).unsqueeze(2)
    decay = g.exp().transpose(1, 2).reshape(B * H, T, 1, 1)
    outs = []
    for t in range(T):
        S = torch.baddbmm(S * decay[:, t], k_cols[:, t], v_rows[:, t])
        outs.append(torch.bmm(q_rows[:, t], S))
    o = torch.cat(outs, dim=1).view(B, H, T, V).transpose(1, 2)
    return o, S.view(B, H, K, V)


def fused_recurrent_lightning_attention(q, k, v, log_decay, scale=None, initial_state=None, output_final_state=False,
                                        cu_seqlens=None):
    """Same contract as :func:`naive_lightning_attention`."""
    lengths = check_lightning_inputs(q, k, v, log_decay, initial_state, cu_seqlens)
    dtype = q.dtype
    q, k, v, g, h0 = prepare_lightning_inputs(q, k, v, log_decay, initial_state, scale)
    o, S = run_lightning_sequences(_recurrent_lightning_core, q, k, v, g, h0, lengths, cu_seqlens is not None)
    return o.to(dtype), (S if output_final_state else None)
