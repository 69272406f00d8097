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

from ..varlen import shape_of

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
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"{name} must be 4-D [B, T, heads, D], got shape {shape_of(x)}")
        if not x.is_floating_point():
            raise ValueError(f"{name} must be a floating tensor, got dtype {x.dtype}")
    B, T, H, D = q.shape
    if shape_of(k) != shape_of(v):
        raise ValueError(f"k and v must have the same shape, got k {shape_of(k)} and v {shape_of(v)}")
    if k.shape[0] != B or k.shape[1] != T or k.shape[3] != D:
        raise ValueError(
            f"k/v must be [B, T, H_kv, D] matching q [B, T, H, D] = {shape_of(q)} in B, T and D, got k {shape_of(k)}"
        )
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share a dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"q, k, v must be on one device, got q {q.device}, k {k.device}, v {v.device}")
    H_kv = k.shape[2]
    if H_kv < 1 or H % H_kv != 0:
        raise ValueError(f"q heads H={H} must be divisible by k/v heads H_kv={H_kv} (q {shape_of(q)}, k {shape_of(k)})")
    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor) or shape_of(attention_mask) != (B, T):
            got = shape_of(attention_mask) if isinstance(attention_mask, torch.Tensor) else type(attention_mask).__name__
            raise ValueError(f"attention_mask must have shape [B, T] = {(B, T)}, got {got}")
        if attention_mask.device != q.device:
            raise ValueError(f"attention_mask must be on q's device {q.device}, got {attention_mask.device}")
    if scale is None:
        return D**-0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise ValueError(f"scale must be a float or None, got {type(scale).__name__}")
    return float(scale)


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


def _causal_key_mask(T: int, attention_mask: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """``[B or 1, 1, T, T]`` bool: key s visible to query t (s <= t, key not padding)."""
    t = torch.arange(T, device=device)
    allowed = (t[None, :] <= t[:, None])[None, None]
    if attention_mask is not None:
        allowed = allowed & (attention_mask != 0)[:, None, None, :]
    return allowed


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
    weights = sa_softmax_weights(scores, _causal_key_mask(T, attention_mask, q.device), mode)
    return torch.matmul(weights, vf).transpose(1, 2).to(q.dtype)
