"""Lightning attention token by token, the reference: ``S_t = λ S_{t-1} + k_tᵀ v_t``, ``o_t = scale · q_t S_t``."""

from __future__ import annotations

import torch

from ._checks import check_lightning_inputs, prepare_lightning_inputs, run_lightning_sequences

__all__ = ["naive_lightning_attention"]


def _naive_lightning_core(q, k, v, g, h0):
    B, T, H, K = q.shape
    S = q.new_zeros(B, H, K, v.shape[-1]) if h0 is None else h0
    outs = []
    for t in range(T):
        S = g[:, t, :, None, None].exp() * S + k[:, t, :, :, None] * v[:, t, :, None, :]
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, t], S))
    return torch.stack(outs, dim=1), S


def naive_lightning_attention(q, k, v, log_decay, scale=None, initial_state=None, output_final_state=False,
                              cu_seqlens=None):
    """q, k ``[B, T, H, K]``, v ``[B, T, H, V]``, log_decay ``[H]`` (<= 0). Returns ``(o in q's dtype, final state
    [N, H, K, V] fp32 or None)``."""
    lengths = check_lightning_inputs(q, k, v, log_decay, initial_state, cu_seqlens)
    dtype = q.dtype
    q, k, v, g, h0 = prepare_lightning_inputs(q, k, v, log_decay, initial_state, scale)
    o, S = run_lightning_sequences(_naive_lightning_core, q, k, v, g, h0, lengths, cu_seqlens is not None)
    return o.to(dtype), (S if output_final_state else None)
