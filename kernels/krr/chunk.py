"""Causal kernel-ridge-regression attention (Cubit), vectorised over batch and heads (the PyTorch path).

Every query ``i`` needs its own solve with the Gram matrix of the keys ``j <= i``; one Cholesky factor serves all of
them. With ``G = κ(K, K) + λ I = L Lᵀ`` over all S keys, the leading ``(i+1) × (i+1)`` block of G has the Cholesky
factor ``L[:i+1, :i+1]``, and ``L⁻¹`` is lower triangular, so with ``W = L⁻¹ V`` (row j uses keys ``<= j`` only)
and ``C = κ(Q, K)``::

    O = ((C L⁻ᵀ) ⊙ M) W,    M[i, j] = 1 iff key j <= query i's position

(entry ``(C L⁻ᵀ)[i, j]`` only reads ``C[i, :j+1]``, so no causal mask is needed on C itself). Padded keys get a
Gram row / column that is zero except ``1 + λ`` on the diagonal and a zero column in C: they are decoupled in L
and contribute exactly 0, as if absent. Math in float32 (float64 stays float64), output in q's dtype; the backward
pass is autograd through ``torch.linalg.cholesky`` / ``solve_triangular``.

Cost: O(S³) per kv head for the Cholesky factor, plus O(T_q · S²) for the triangular solve of C, and O(S²)
memory per head (the ``[S, S]`` Gram matrix). A decode step recomputes the factor over the whole cache; appending
one row to the previous factor (``l = L⁻¹ g``, ``d = sqrt(g_nn − l·l)``) would make a step O(S²), which is not done.
Cholesky needs ``κ(K, K) + λ I`` numerically positive definite: a very small ridge in float32 can make it fail
(``torch.linalg.LinAlgError``).
"""

from __future__ import annotations

import torch

from .naive import krr_kernel, validate_krr_inputs

__all__ = ["krr_attention_torch"]


def krr_attention_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    ridge: float,
    temperature: float,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal KRR attention; same arguments and result as :func:`naive_krr_attention`.

    q ``[B, T_q, H, D]`` (the last T_q positions), k ``[B, S, H_kv, D]``, v ``[B, S, H_kv, D_v]``, ridge λ > 0,
    temperature τ > 0, attention_mask ``[B, S]`` (1 = real token) or None. Returns ``[B, T_q, H, D_v]`` in q's
    dtype; differentiable in q, k, v.
    """
    ridge, temperature = validate_krr_inputs(q, k, v, ridge, temperature, attention_mask)
    B, Tq, H, D = q.shape
    S, H_kv, Dv = k.shape[1], k.shape[2], v.shape[3]
    group = H // H_kv
    if B * Tq * H == 0:
        return q.new_zeros(B, Tq, H, Dv)
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    real = torch.ones(B, S, dtype=torch.bool, device=q.device) if attention_mask is None else attention_mask != 0
    pad = ~real[:, None, :, None]  # [B, 1, S, 1]

    # One factor per kv head; its query heads are stacked as rows: row r = (group member r // T_q, query r % T_q).
    qf = q.to(dtype).transpose(1, 2).reshape(B, H_kv, group * Tq, D)
    # Zero padded k / v first so that whatever the padding holds (even NaN) cannot reach the output or gradients.
    kf = k.to(dtype).transpose(1, 2).masked_fill(pad, 0)  # [B, H_kv, S, D]
    vf = v.to(dtype).transpose(1, 2).masked_fill(pad, 0)  # [B, H_kv, S, Dv]

    gram = krr_kernel(kf, kf, temperature).masked_fill(pad | pad.mT, 0)
    gram = gram + torch.diag_embed(ridge + (~real).to(dtype))[:, None]  # λ on real keys, 1 + λ on padded ones
    L = torch.linalg.cholesky(gram)  # [B, H_kv, S, S]
    W = torch.linalg.solve_triangular(L, vf, upper=False)  # L⁻¹ V
    C = krr_kernel(qf, kf, temperature).masked_fill(pad.mT, 0)  # [B, H_kv, group * T_q, S]
    X = torch.linalg.solve_triangular(L.mT, C, upper=True, left=False)  # C L⁻ᵀ

    query_pos = torch.arange(S - Tq, S, device=q.device).repeat(group)  # [group * T_q]
    causal = torch.arange(S, device=q.device)[None, :] <= query_pos[:, None]
    o = X.masked_fill(~causal, 0) @ W  # [B, H_kv, group * T_q, Dv]
    return o.reshape(B, H, Tq, Dv).transpose(1, 2).to(q.dtype)
