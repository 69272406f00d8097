"""Chunkwise Kimi Delta Attention (CPU path): the DPLR chunk form specialised to KDA, backward by plain autograd.

Per chunk of C tokens with in-chunk cumulative per-channel log decay ``b_i = g_1 + ... + g_i`` (a K-vector, fp32)
and entering state S0, writing ``u_j = beta_j (v_j - S'_j^T k_j)`` for the delta-rule correction of token j::

    A[i, j]  = beta_i sum_d k_id k_jd exp(b_id - b_jd)             (j < i, strictly lower)
    (I + A) [U | W] = [beta v | beta k * exp(b)]                    (unit-lower-triangular solve)
    u        = U - W S0
    o_i      = scale [ (q_i * exp(b_i)) S0 + sum_{j<=i} (sum_d q_id k_jd exp(b_id - b_jd)) u_j ]
    S_next   = Diag(exp(b_C)) S0 + sum_j (k_j * exp(b_C - b_j))^T u_j

Numerics: every exponent is <= 0, so nothing overflows however strong the gates are, and every exponent is a sum of
g over the tokens it spans (prefix sums, suffix sums, sums inside a block), never the difference of two long
cumsums: a gate spike (g = -1000 on some channel) costs no precision elsewhere in the chunk.

The pairwise decays ``exp(b_i - b_j)`` differ per channel, so they cannot be one ``[C, C]`` mask; the two ``[C, C]``
matrices come from :func:`..decay_pairs.decayed_pairs` (exact halving, one matmul per block), with chunks padded to a
power of two by inert tokens (q = k = v = 0, g = 0, beta = 0).
Everything but the cross-chunk recurrence is vectorised over a group of chunks (sized to stay in cache,
:mod:`..chunk_groups`); the recurrence works on tensors unbound once before the loop (slicing whole tensors per chunk would make the backward O(T^2)).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..chunk_groups import chunk_group_size, scan_chunk_groups
from ..decay_pairs import decayed_pairs, prefix_sum, suffix_sum
from ._checks import check_kda_inputs, prepare_kda_inputs, run_kda_sequences

__all__ = ["chunk_kda"]


def _kda_chunk_group(q, k, v, g, beta, S):
    """One group of chunks ``[BH, G, P2, *]`` (q already scaled) from entering state ``S [BH, K, V]``: returns the
    group's output ``[BH, G, P2, V]`` and the state after it."""
    V, K = v.shape[-1], k.shape[-1]
    b = prefix_sum(g)  # [BH, G, P2, K] in-chunk cumulative log decay
    b_tail = suffix_sum(g)  # b_last - b, summed directly (no cancellation when g has large spikes)

    attn, A = decayed_pairs([q, k], k, g)  # [BH, G, P2, P2] each, causal incl. diagonal
    # Only the strict lower triangle of A is read by the unit-triangular solve (and its backward projects onto it).
    A = A * beta.unsqueeze(-1)
    k_beta = k * beta.unsqueeze(-1)
    rhs = torch.cat([v * beta.unsqueeze(-1), k_beta * b.exp()], dim=-1)
    U, W = torch.linalg.solve_triangular(A, rhs, upper=False, unitriangular=True).split([V, K], dim=-1)

    q_decayed = q * b.exp()
    b_last = b[..., -1:, :]  # [BH, G, 1, K]
    k_decayed_t = (k * b_tail.exp()).transpose(-1, -2)  # [BH, G, K, P2]
    chunk_decay = b_last.exp().transpose(-1, -2)  # [BH, G, K, 1]: per state row

    U_l, W_l, kdt_l, cd_l = U.unbind(1), W.unbind(1), k_decayed_t.unbind(1), chunk_decay.unbind(1)
    states, v_news = [], []
    for i in range(len(U_l)):
        states.append(S)
        v_new = torch.baddbmm(U_l[i], W_l[i], S, alpha=-1.0)  # u = U - W S0
        v_news.append(v_new)
        S = torch.baddbmm(S * cd_l[i], kdt_l[i], v_new)
    return q_decayed @ torch.stack(states, dim=1) + attn @ torch.stack(v_news, dim=1), S


def _kda_chunk_core(q, k, v, g, beta, h0, *, scale, chunk_size):
    B, T, H, K = q.shape
    V = v.shape[-1]
    BH = B * H
    C = min(chunk_size, T)  # tokens per chunk
    NC = -(-T // C)
    P2 = 1 << (C - 1).bit_length()  # each chunk padded to a power of two for the halving in decayed_pairs

    def chunked(x):  # [B, T, H, *] -> [B*H, NC, P2, *]; padding tokens (q = k = v = 0, g = 0, beta = 0) are inert
        x = x.transpose(1, 2)
        x = F.pad(x, (0, 0, 0, NC * C - T) if x.dim() == 4 else (0, NC * C - T))
        x = x.reshape(BH, NC, C, *x.shape[3:])
        if P2 > C:  # inert tokens at the end of every chunk: no decay, no update, output dropped
            x = F.pad(x, (0, 0, 0, P2 - C) if x.dim() == 4 else (0, P2 - C))
        return x

    q, k, v, g, beta = chunked(q * scale), chunked(k), chunked(v), chunked(g), chunked(beta)
    S = q.new_zeros(BH, K, V) if h0 is None else h0.reshape(BH, K, V)
    group = chunk_group_size(NC, BH * P2 * max(P2, K, V) * q.element_size(), q.device)
    o, S = scan_chunk_groups(_kda_chunk_group, (q, k, v, g, beta), S, dim=1, group=group)
    o = o[:, :, :C].reshape(B, H, NC * C, V)[:, :, :T].transpose(1, 2)
    return o, S.reshape(B, H, K, V)


def chunk_kda(
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
    """Chunkwise KDA. Same contract as ``naive_recurrent_kda``, plus ``chunk_size``.

    q, k, g ``[B, T, H, K]`` (g the per-channel log decay, <= 0, fp32 recommended); v ``[B, T, H, V]``; beta
    ``[B, T, H]``; initial_state ``[N, H, K, V]``; cu_seqlens ``[N + 1]`` with B == 1.
    Returns ``(o [B, T, H, V] in q's dtype, final_state [N, H, K, V] fp32 (fp64) or None)``.
    """
    check_kda_inputs(q, k, v, g, beta, scale, initial_state, cu_seqlens, chunk_size)
    dtype = q.dtype
    q, k, v, g, beta, h0, scale = prepare_kda_inputs(q, k, v, g, beta, initial_state, scale, use_qk_l2norm)
    o, ht = run_kda_sequences(
        _kda_chunk_core, q, k, v, g, beta, h0, cu_seqlens, scale=scale, chunk_size=chunk_size
    )
    return o.to(dtype), (ht if output_final_state else None)
