"""Reference causal kernel-ridge-regression attention (Cubit): the specification, one query at a time.

Cubit reads softmax attention as Nadaraya–Watson regression and replaces it with the closed-form kernel ridge
regression (KRR) estimate. Query ``i`` regresses on the real (unpadded) keys at positions ``j <= i``::

    O_i = κ(q_i, K_S) (κ(K_S, K_S) + λ I)^{-1} V_S,   S = {j <= i, j real}

with the normalised RBF kernel ``κ(a, b) = exp(τ (â·b̂ − 1))``, ``â = a / ‖a‖₂`` over the head dim (values in
(0, 1], diagonal 1, positive definite, so ``κ(K, K) + λ I`` is well conditioned for λ > 0). λ = ``ridge``,
τ = ``temperature``. A query with no real key outputs 0. The queries are the last ``T_q`` of the ``S`` positions.

Loops over batch, head and query and calls ``torch.linalg.solve``: for tests only.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..attention_checks import check_attention_mask
from ..varlen import shape_of

__all__ = ["krr_kernel", "naive_krr_attention", "validate_krr_inputs"]


def validate_krr_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    ridge: float,
    temperature: float,
    attention_mask: torch.Tensor | None,
) -> tuple[float, float]:
    """Raise ``ValueError`` naming the offending tensor / field; return ``(ridge, temperature)`` as floats."""
    for name, value in (("ridge", ridge), ("temperature", temperature)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"krr_attention: {name} must be a finite number > 0, got {value!r}")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
            got = (shape_of(x), x.dtype) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"krr_attention: {name} must be a 4-D floating tensor, got {got}")
    B, Tq, H, D = q.shape
    _, S, H_kv, _ = k.shape
    if k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"krr_attention: k must be [B, S, H_kv, D] matching q {shape_of(q)} in B and D, got k {shape_of(k)}")
    if v.shape[:3] != k.shape[:3]:
        raise ValueError(f"krr_attention: v must be [B, S, H_kv, D_v] matching k {shape_of(k)}, got v {shape_of(v)}")
    if H_kv < 1 or H % H_kv != 0:
        raise ValueError(f"krr_attention: q heads H={H} must be divisible by k/v heads H_kv={H_kv} "
                         f"(q {shape_of(q)}, k {shape_of(k)})")
    if Tq > S:
        raise ValueError(f"krr_attention: q has {Tq} positions, more than the {S} of k/v (q {shape_of(q)}, k {shape_of(k)})")
    if k.dtype != q.dtype or v.dtype != q.dtype or k.device != q.device or v.device != q.device:
        raise ValueError(f"krr_attention: q, k, v must share dtype and device, got q {q.dtype}/{q.device}, "
                         f"k {k.dtype}/{k.device}, v {v.dtype}/{v.device}")
    check_attention_mask(attention_mask, B, S, q.device)
    return float(ridge), float(temperature)


def krr_kernel(a: torch.Tensor, b: torch.Tensor, temperature: float) -> torch.Tensor:
    """``κ(a, b) = exp(τ (â·b̂ − 1))`` for rows of a ``[..., n, D]`` and b ``[..., m, D]`` → ``[..., n, m]``.

    ``F.normalize`` clamps the norm at 1e-12, so an all-zero vector gives κ = exp(−τ) instead of NaN.
    """
    return torch.exp(temperature * (F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).transpose(-1, -2) - 1))


def naive_krr_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    ridge: float,
    temperature: float,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """q ``[B, T_q, H, D]``, k ``[B, S, H_kv, D]``, v ``[B, S, H_kv, D_v]``, attention_mask ``[B, S]`` or None
    → ``[B, T_q, H, D_v]`` in q's dtype (math in float64). Differentiable in q, k, v."""
    ridge, temperature = validate_krr_inputs(q, k, v, ridge, temperature, attention_mask)
    B, Tq, H, _ = q.shape
    S, H_kv, Dv = k.shape[1], k.shape[2], v.shape[3]
    group = H // H_kv
    if B * Tq * H == 0:
        return q.new_zeros(B, Tq, H, Dv)
    real = torch.ones(B, S, dtype=torch.bool) if attention_mask is None else attention_mask.cpu() != 0
    qd, kd, vd = q.double(), k.double(), v.double()
    rows = []
    for b in range(B):
        for t in range(Tq):
            pos = S - Tq + t  # queries are the last T_q positions
            keys = [j for j in range(pos + 1) if real[b, j]]
            for h in range(H):
                if not keys:
                    rows.append(qd.new_zeros(Dv))
                    continue
                K, V = kd[b, keys, h // group], vd[b, keys, h // group]
                gram = krr_kernel(K, K, temperature) + ridge * torch.eye(len(keys), dtype=K.dtype, device=K.device)
                alpha = torch.linalg.solve(gram, V)
                rows.append(krr_kernel(qd[b, t, h][None], K, temperature)[0] @ alpha)
    return torch.stack(rows).view(B, Tq, H, Dv).to(q.dtype)


def naive_krr_attention_weights(q: torch.Tensor, k: torch.Tensor, *, ridge: float, temperature: float,
                                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The ``[B, H, T_q, S]`` maps W with ``output = W V`` (``κ(q, K)(κ(K, K) + λI)⁻¹`` over each query's causal
    prefix of real keys; zeros elsewhere): what ``output_attentions`` returns. q are the last T_q of the S positions
    of k. Math in float64, one solve per query and head (diagnostics, not a training path)."""
    B, Tq, H, _ = q.shape
    S, H_kv = k.shape[1], k.shape[2]
    group = H // H_kv
    real = torch.ones(B, S, dtype=torch.bool) if attention_mask is None else attention_mask.cpu() != 0
    qd, kd = q.double(), k.double()
    weights = qd.new_zeros(B, H, Tq, S)
    for b in range(B):
        for t in range(Tq):
            keys = [j for j in range(S - Tq + t + 1) if real[b, j]]
            if not keys:
                continue
            for h in range(H):
                K = kd[b, keys, h // group]
                gram = krr_kernel(K, K, temperature) + ridge * torch.eye(len(keys), dtype=K.dtype, device=K.device)
                row = torch.linalg.solve(gram, krr_kernel(K, qd[b, t, h][None], temperature))[:, 0]  # gram symmetric
                weights[b, h, t, keys] = row
    return weights.to(q.dtype)
