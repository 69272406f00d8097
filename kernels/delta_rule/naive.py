"""Step-by-step fp32 reference of the gated delta rule (the spec; slow, for tests)."""

from __future__ import annotations

import torch

from ._checks import check_gated_delta_rule_inputs, prepare_inputs, run_sequences


def _naive_core(q, k, v, g, beta, h0, *, scale):
    B, T, H, K = q.shape
    V = v.shape[-1]
    S = q.new_zeros(B, H, K, V) if h0 is None else h0
    outs = []
    for t in range(T):
        q_t, k_t, v_t = q[:, t], k[:, t], v[:, t]  # [B, H, K|V]
        S = S * g[:, t].exp()[..., None, None]  # decay
        pred = torch.einsum("bhkv,bhk->bhv", S, k_t)  # what the decayed state predicts for k_t
        S = S + beta[:, t][..., None, None] * k_t[..., :, None] * (v_t - pred)[..., None, :]  # delta update
        outs.append(scale * torch.einsum("bhkv,bhk->bhv", S, q_t))
    return torch.stack(outs, dim=1), S


def naive_recurrent_gated_delta_rule(
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
    """Reference gated delta rule, one token at a time in fp32.

    ``S_t = exp(g_t) S_{t-1};  S_t += beta_t k_t (v_t - S_t^T k_t)^T;  o_t = scale S_t^T q_t``.
    Shapes: q, k ``[B, T, H, K]``, v ``[B, T, HV, V]``, g, beta ``[B, T, HV]``, initial_state ``[N, HV, K, V]``.
    Returns ``(o [B, T, HV, V] in q's dtype, final_state [N, HV, K, V] fp32 or None)``.
    """
    check_gated_delta_rule_inputs(q, k, v, g, beta, scale, initial_state, cu_seqlens)
    dtype = q.dtype
    q, k, v, g, beta, scale = prepare_inputs(q, k, v, g, beta, scale, use_qk_l2norm)
    o, ht = run_sequences(_naive_core, q, k, v, g, beta, initial_state, cu_seqlens, scale=scale)
    return o.to(dtype), (ht if output_final_state else None)
