"""Reference causal attention with Self-Adjust Softmax (SA-Softmax).

For one query row ``t`` with scaled scores ``x_s = scale * q_t . k_s`` over its attendable keys ``s`` (``s <= t``,
key not padding) and ``p = softmax(x)`` over those keys, the attention weights are

* ``mode="plain"``:      ``w_s = x_s * p_s``
* ``mode="normalized"``: ``w_s = (x_s - a) / max(b - a, EPS) * p_s`` with ``a = min(x_min, 0)``, ``b = max(0, x_max)``

and the output is ``o_t = sum_s w_s v_s`` (the weights no longer sum to one). Masked keys (non-causal, padding) get
weight 0 and do not enter the softmax nor the min / max. A row with no attendable key outputs 0 (zero gradients).

Conventions shared by every backend (so that they agree exactly, also in the gradient):

* ``EPS = 1e-6`` clamps the span ``b - a``; it only bites when every score of the row is (nearly) 0, and then the
  factor is ``(x - a) / EPS`` with no gradient through the clamped span.
* ``a`` takes the row minimum only where it is ``< 0`` (else the constant 0, no gradient); ``b`` the maximum only
  where it is ``> 0``. The (sub)gradient of the minimum / maximum goes to the *first* key (lowest position) holding
  it, not split among ties as ``torch.amin`` / ``torch.amax`` would.

Only full causal self-attention (queries and keys both the T positions) is supported, not decode with a longer
key prefix. Math in fp32 (fp64 stays fp64), output in q's dtype. This module builds the full ``[T, T]`` weights: it
is the specification, not the fast path.
"""

from __future__ import annotations

import torch

from ..attention_checks import (
    causal_key_mask,
    check_attention_mask,
    check_qkv,
    resolve_scale,
    trailing_causal_key_mask,
)

__all__ = ["EPS", "SA_MODES", "naive_sa_softmax_attention", "validate_sa_softmax_inputs"]

SA_MODES = ("plain", "normalized")
EPS = 1e-6


def validate_sa_softmax_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mode: str,
    scale: float | None,
    attention_mask: torch.Tensor | None,
) -> float:
    """Raise ``ValueError`` naming the offending tensor/field; return the effective scale."""
    if not isinstance(mode, str) or mode not in SA_MODES:
        raise ValueError(f"mode must be one of {SA_MODES}, got {mode!r}")
    check_qkv(q, k, v)
    B, T, _, D = q.shape
    check_attention_mask(attention_mask, B, T, q.device)
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
        raise ValueError(f"scale must be a float or None, got {type(scale).__name__}")
    return resolve_scale(scale, D)


def sa_softmax_weights(scores: torch.Tensor, allowed: torch.Tensor, mode: str) -> torch.Tensor:
    """SA-Softmax weights over the last dim of ``scores``; ``allowed`` (broadcastable bool) marks attendable keys.

    Differentiable; rows without an allowed key give zeros (and zero gradients), never NaN.
    """
    masked = scores.masked_fill(~allowed, float("-inf"))
    row_max = masked.detach().amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))  # empty row: no inf - inf
    e = torch.exp(masked - row_max)
    denom = e.sum(dim=-1, keepdim=True)
    probs = e / torch.where(denom > 0, denom, torch.ones_like(denom))
    x = scores.masked_fill(~allowed, 0.0)  # masked scores are 0, not -inf: the factor times p = 0 stays 0
    if mode == "plain":
        return x * probs
    # argmin / argmax return the first of tied positions: the (sub)gradient goes to that key only.
    lo = scores.detach().masked_fill(~allowed, float("inf")).argmin(dim=-1, keepdim=True)
    hi = scores.detach().masked_fill(~allowed, float("-inf")).argmax(dim=-1, keepdim=True)
    x_min, x_max = x.gather(-1, lo), x.gather(-1, hi)  # an empty row gathers a masked 0
    zero = torch.zeros_like(x_min)
    a = torch.where(x_min < 0, x_min, zero)
    b = torch.where(x_max > 0, x_max, zero)
    span = b - a
    den = torch.where(span > EPS, span, torch.full_like(span, EPS))
    return (x - a) / den * probs


def naive_sa_softmax_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    mode: str = "plain",
    scale: float | None = None,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal SA-Softmax attention via the full ``[T, T]`` weight matrix.

    q ``[B, T, H, D]``, k/v ``[B, T, H_kv, D]`` (q head ``h`` uses kv head ``h // (H // H_kv)``), ``mode`` in
    ``("plain", "normalized")``, scale (default ``D ** -0.5``), attention_mask ``[B, T]`` (1 = token, 0 = padding)
    or None. Queries and keys are the same T positions (no decode against a longer cache). Returns
    ``[B, T, H, D]`` in q's dtype; raises ``ValueError`` naming the bad argument.
    """
    scale = validate_sa_softmax_inputs(q, k, v, mode, scale, attention_mask)
    T, H = q.shape[1], q.shape[2]
    group = H // k.shape[2]
    acc = torch.promote_types(q.dtype, torch.float32)
    qf = q.to(acc).transpose(1, 2)  # [B, H, T, D]
    kf = k.to(acc).repeat_interleave(group, dim=2).transpose(1, 2)
    vf = v.to(acc).repeat_interleave(group, dim=2).transpose(1, 2)
    scores = torch.matmul(qf, kf.transpose(-1, -2)) * scale  # [B, H, T, T]
    weights = sa_softmax_weights(scores, causal_key_mask(T, attention_mask, q.device), mode)
    return torch.matmul(weights, vf).transpose(1, 2).to(q.dtype)


def sa_softmax_attention_weights(q: torch.Tensor, k: torch.Tensor, *, mode: str, scale: float,
                                 attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The ``[B, H, T_q, S]`` SA-Softmax weight maps (what ``output_attentions`` returns); q ``[B, T_q, H, D]`` are
    the last T_q of the S positions of k ``[B, S, H_kv, D]``; attention_mask ``[B, S]`` or None."""
    group = q.shape[2] // k.shape[2]
    acc = torch.promote_types(q.dtype, torch.float32)
    qf = q.to(acc).transpose(1, 2)
    kf = k.to(acc).repeat_interleave(group, dim=2).transpose(1, 2)
    scores = torch.matmul(qf, kf.transpose(-1, -2)) * scale
    allowed = trailing_causal_key_mask(q.shape[1], attention_mask, k.shape[1], q.device)
    return sa_softmax_weights(scores, allowed, mode).to(q.dtype)
