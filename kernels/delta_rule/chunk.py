"""Chunkwise gated delta rule (CPU path): WY / UT transform inside chunks, a short recurrence across chunks.

Per chunk of C tokens with in-chunk cumulative log-decay ``b_i = g_1 + ... + g_i`` (fp32) and entering state S0:

    A[i, j] = beta_i (k_i . k_j) exp(b_i - b_j)          (j < i, strictly lower)
    (I + A) [U | W] = [beta v | beta k exp(b)]           (unit-lower-triangular solve)
    v_new   = U - W S0                                   (the delta-rule corrections)
    o       = scale [ (q exp(b)) S0 + ((q k^T) * exp(b_i - b_j))_{j<=i} v_new ]
    S_next  = exp(b_C) S0 + (k exp(b_C - b))^T v_new

Every exponent is <= 0 (upper-triangle differences are masked to -inf before ``exp``), so nothing overflows even
for very strong gates. Everything but the cross-chunk recurrence is vectorised over a group of chunks at once
(groups sized to stay in cache, :mod:`..chunk_groups`); the recurrence works on tensors unbound once per group (slicing
whole tensors per chunk would make the backward O(T^2)). Backward is plain autograd.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F

from ..chunk_groups import chunk_group_size, scan_chunk_groups
from ._checks import check_gated_delta_rule_inputs, prepare_inputs, run_sequences


def _chunk_group(q, k, v, g, beta, S, causal):
    """One group of chunks (``[BH, G, C, *]``; q already scaled) from entering state ``S [BH, K, V]``: returns the
    group's output ``[BH, G, C, V]`` and the state after it."""
    V, K = v.shape[-1], k.shape[-1]
    b = g.cumsum(dim=-1)  # [BH, G, C] in-chunk cumulative log decay (fp32)
    rel = (b.unsqueeze(-1) - b.unsqueeze(-2)).masked_fill(~causal, float("-inf")).exp()  # exp(b_i - b_j), j <= i

    k_beta = k * beta.unsqueeze(-1)
    # Only the strict lower triangle of A is read by the unit-triangular solve (and its backward projects onto it).
    A = (k_beta @ k.transpose(-1, -2)) * rel
    rhs = torch.cat([v * beta.unsqueeze(-1), k_beta * b.exp().unsqueeze(-1)], dim=-1)
    U, W = torch.linalg.solve_triangular(A, rhs, upper=False, unitriangular=True).split([V, K], dim=-1)

    attn = (q @ k.transpose(-1, -2)) * rel  # causal incl. diagonal (rel is 0 above it)
    q_decayed = q * b.exp().unsqueeze(-1)
    b_last = b[..., -1:]
    k_decayed_t = (k * (b_last - b).exp().unsqueeze(-1)).transpose(-1, -2)  # [BH, G, K, C]
    chunk_decay = b_last.exp().unsqueeze(-1)  # [BH, G, 1, 1]

    # Tensors unbound once before the loop (slicing whole tensors per chunk would make the backward quadratic).
    U_l, W_l, kdt_l, cd_l = U.unbind(1), W.unbind(1), k_decayed_t.unbind(1), chunk_decay.unbind(1)
    states, v_news = [], []
    for c in range(len(U_l)):
        states.append(S)
        v_new = torch.baddbmm(U_l[c], W_l[c], S, alpha=-1.0)
        v_news.append(v_new)
        S = torch.baddbmm(S * cd_l[c], kdt_l[c], v_new)
    o = q_decayed @ torch.stack(states, dim=1) + attn @ torch.stack(v_news, dim=1)  # [BH, G, C, V]
    return o, S


def _gdr_chunk_core(q, k, v, g, beta, h0, *, scale, chunk_size):
    B, T, H, K = q.shape
    V = v.shape[-1]
    BH = B * H
    C = min(chunk_size, T)
    pad = (-T) % C
    NC = (T + pad) // C

    def chunked(x):  # [B, T, H, *] -> [B*H, NC, C, *]; padding tokens have k = v = q = 0, g = 0, beta = 0
        x = x.transpose(1, 2)
        if pad:
            x = F.pad(x, (0, 0, 0, pad)) if x.dim() == 4 else F.pad(x, (0, pad))
        return x.reshape(BH, NC, C, *x.shape[3:])

    q, k, v = chunked(q * scale), chunked(k), chunked(v)
    g, beta = chunked(g), chunked(beta)
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    group = chunk_group_size(NC, BH * C * max(C, K, V) * q.element_size(), q.device)
    S = q.new_zeros(BH, K, V) if h0 is None else h0.reshape(BH, K, V)
    o, S = scan_chunk_groups(partial(_chunk_group, causal=causal), (q, k, v, g, beta), S, dim=1, group=group)
    o = o.reshape(B, H, NC * C, V)[:, :, :T].transpose(1, 2)
    return o, S.reshape(B, H, K, V)


def chunk_gated_delta_rule(
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
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunkwise gated delta rule. Same contract as ``naive_recurrent_gated_delta_rule``, plus ``chunk_size``.

    q, k ``[B, T, H, K]``; v ``[B, T, HV, V]`` (HV a multiple of H); g (log decay, <= 0), beta ``[B, T, HV]``;
    initial_state ``[N, HV, K, V]``; cu_seqlens ``[N + 1]`` with B == 1. Returns ``(o in q's dtype, fp32 state|None)``.
    """
    check_gated_delta_rule_inputs(q, k, v, g, beta, scale, initial_state, cu_seqlens, chunk_size)
    dtype = q.dtype
    q, k, v, g, beta, scale = prepare_inputs(q, k, v, g, beta, scale, use_qk_l2norm)
    o, ht = run_sequences(
        _gdr_chunk_core, q, k, v, g, beta, initial_state, cu_seqlens, scale=scale, chunk_size=chunk_size
    )
    return o.to(dtype), (ht if output_final_state else None)
