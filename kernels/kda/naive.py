"""Step-by-step reference of Kimi Delta Attention (the spec; slow, for tests).

KDA (Kimi Linear, arXiv 2510.26692) is the gated delta rule with a per-channel (per key dimension) decay::

    S_t = (I - beta_t k_t k_t^T) Diag(exp(g_t)) S_{t-1} + beta_t k_t v_t^T,      o_t = scale * S_t^T q_t

i.e. ``S' = exp(g_t)[:, None] * S_{t-1};  S_t = S' + beta_t k_t (v_t - S'^T k_t)^T``.
"""

from __future__ import annotations

import torch

from ._checks import check_kda_inputs, prepare_kda_inputs, run_kda_sequences

__all__ = ["naive_recurrent_kda"]


def _kda_naive_core(q, k, v, g, beta, h0, *, scale):
    B, T, H, K = q.shape
    V = v.shape[-1]
    S = q.new_zeros(B, H, K, V) if h0 is None else h0
    outs = []
    for t in range(T):
        q_t, k_t, v_t = q[:, t], k[:, t], v[:, t]  # [B, H, K|V]
        S = S * g[:, t].exp()[..., None]  # per-channel decay: row k of S scaled by exp(g_t[k])
        pred = torch.einsum("bhkv,bhk->bhv", S, k_t)  # what the decayed state predicts for k_t
        S = S + beta[:, t][..., None, None] * k_t[..., :, None] * (v_t - pred)[..., None, :]  # delta update
        outs.append(scale * torch.einsum("bhkv,bhk->bhv", S, q_t))
    return torch.stack(outs, dim=1), S


def naive_recurrent_kda(
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
    """Reference KDA, one token at a time in fp32 (fp64 when any input is fp64).

    ``S_t = exp(g_t)[:, None] * S_{t-1};  S_t += beta_t k_t (v_t - S_t^T k_t)^T;  o_t = scale S_t^T q_t``.
    Shapes: q, k, g ``[B, T, H, K]`` (g the log decay, <= 0, fp32 recommended), v ``[B, T, H, V]``, beta
    ``[B, T, H]``, initial_state ``[N, H, K, V]``; ``cu_seqlens`` ``[N + 1]`` with ``B == 1`` packs N sequences.
    ``scale`` defaults to ``K ** -0.5``; ``use_qk_l2norm`` L2-normalises q and k over K first (eps inside the sqrt).
    Returns ``(o [B, T, H, V] in q's dtype, final_state [N, H, K, V] fp32 (fp64) or None)``.
    """
    check_kda_inputs(q, k, v, g, beta, scale, initial_state, cu_seqlens)
    dtype = q.dtype
    q, k, v, g, beta, h0, scale = prepare_kda_inputs(q, k, v, g, beta, initial_state, scale, use_qk_l2norm)
    o, ht = run_kda_sequences(_kda_naive_core, q, k, v, g, beta, h0, cu_seqlens, scale=scale)
    return o.to(dtype), (ht if output_final_state else None)
