"""Per-token gated delta rule for decoding: four batched ops per step, inputs unbound once (one token: about ten)."""

from __future__ import annotations

import torch

from ._checks import check_gated_delta_rule_inputs, prepare_inputs, run_sequences


def delta_rule_recurrent_core(q, k, v, g, beta, h0, *, scale):
    """The delta rule token by token; g is a per-head log decay ``[B, T, H]`` (gated delta rule) or a per-key-channel
    one ``[B, T, H, K]`` (Kimi Delta Attention), scaling the state's rows."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    if T == 1:
        return _one_step(q, k, v, g, beta, h0, scale)
    BH = B * H

    def heads_first(x):  # [B, T, H, D] -> [B*H, T, D]
        return x.transpose(1, 2).reshape(BH, T, x.shape[-1])

    b = beta.unsqueeze(-1)
    q_rows = heads_first(q * scale).unsqueeze(2).unbind(1)  # [BH, 1, K] each
    k_cols = heads_first(k).unsqueeze(3).unbind(1)  # [BH, K, 1]
    bk_rows = heads_first(k * b).unsqueeze(2).unbind(1)  # [BH, 1, K]
    bv_rows = heads_first(v * b).unsqueeze(2).unbind(1)  # [BH, 1, V]
    decay = g.exp() if g.dim() == 4 else g.exp().unsqueeze(-1)
    decay = heads_first(decay).unsqueeze(3).unbind(1)  # [BH, K or 1, 1]: one factor per state row, or per head
    S = q.new_zeros(BH, K, V) if h0 is None else h0.reshape(BH, K, V)
    outs = []
    for t in range(T):
        S = S * decay[t]
        u = torch.baddbmm(bv_rows[t], bk_rows[t], S, alpha=-1.0)  # beta (v - S^T k)
        S = torch.baddbmm(S, k_cols[t], u)  # S + k u^T
        outs.append(torch.bmm(q_rows[t], S))
    o = torch.stack(outs, dim=1).reshape(B, H, T, V).transpose(1, 2)
    return o, S.reshape(B, H, K, V)


def _one_step(q, k, v, g, beta, h0, scale):
    """One token (decoding) on ``[B·H, ...]`` views: a decay multiply and three batched matmuls."""
    B, _, H, K = q.shape
    V = v.shape[-1]
    BH = B * H
    S = q.new_zeros(BH, K, V) if h0 is None else h0.reshape(BH, K, V)
    decay = g.reshape(BH, -1, 1).exp()  # [BH, 1 or K, 1]: per head, or per state row (KDA)
    b = beta.reshape(BH, 1, 1)
    k_row = k.reshape(BH, 1, K)
    S = S * decay
    u = torch.baddbmm(v.reshape(BH, 1, V) * b, k_row * b, S, alpha=-1.0)  # beta (v - S^T k), [BH, 1, V]
    S = torch.baddbmm(S, k_row.transpose(1, 2), u)  # S + k u^T
    o = torch.bmm(q.reshape(BH, 1, K) * scale, S)  # [BH, 1, V]
    return o.view(B, 1, H, V), S.view(B, H, K, V)


def fused_recurrent_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.LongTensor | None = None,
    use_qk_l2norm: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gated delta rule, token by token (decode path). Same contract as ``naive_recurrent_gated_delta_rule``."""
    check_gated_delta_rule_inputs(q, k, v, g, beta, scale, initial_state, cu_seqlens)
    dtype = q.dtype
    q, k, v, g, beta, scale = prepare_inputs(q, k, v, g, beta, scale, use_qk_l2norm)
    o, ht = run_sequences(delta_rule_recurrent_core, q, k, v, g, beta, initial_state, cu_seqlens, scale=scale)
    return o.to(dtype), (ht if output_final_state else None)
