"""Sliding-window attention of new queries over cached keys (decoding and chunked prefill).

The keys are the last ``T_k`` positions of the sequence and the ``T_q`` queries are its last ``T_q`` of them, so query
``i`` sits at key position ``T_k - T_q + i``. Both stay short (``T_k`` <= window - 1 + ``T_q`` with transformers'
sliding-window cache), so a dense masked score matrix is the right tool here. Same masking and sink semantics as
:func:`naive_sliding_window_attention`.
"""

from __future__ import annotations

import torch

__all__ = ["sliding_window_attention_over_cache"]


def sliding_window_attention_over_cache(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int,
    sink_logits: torch.Tensor | None = None,
    scale: float | None = None,
    key_mask: torch.Tensor | None = None,
    return_mass: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """q ``[B, T_q, H, D]``, k/v ``[B, T_k, H_kv, D]`` with ``T_k >= T_q``, key_mask ``[B, T_k]`` (0 = padding).

    Returns ``[B, T_q, H, D]`` in q's dtype (and with ``return_mass`` each row's ``Σ exp(score - row max)``
    ``[B, T_q, H]``, as :func:`naive_sliding_window_attention`).
    """
    B, Tq, H, D = q.shape
    Tk, H_kv = k.shape[1], k.shape[2]
    if k.shape[0] != B or Tk < Tq or k.shape[-1] != D or v.shape != k.shape or H % H_kv:
        raise ValueError(
            f"expected q [B, T_q, H, D] and k, v [B, T_k >= T_q, H_kv | H, D]; got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if key_mask is not None and tuple(key_mask.shape) != (B, Tk):
        raise ValueError(f"key_mask must have shape [B, T_k] = {(B, Tk)}, got {tuple(key_mask.shape)}")
    scale = D**-0.5 if scale is None else scale
    acc = torch.promote_types(q.dtype, torch.float32)
    G = H // H_kv
    qf = q.to(acc).transpose(1, 2).reshape(B, H_kv, G * Tq, D)
    kf, vf = k.to(acc).transpose(1, 2), v.to(acc).transpose(1, 2)  # [B, H_kv, T_k, D]
    scores = (qf @ kf.transpose(-1, -2) * scale).view(B, H_kv, G, Tq, Tk)

    pos_q = torch.arange(Tq, device=q.device) + (Tk - Tq)
    dist = pos_q[:, None] - torch.arange(Tk, device=q.device)[None, :]
    allowed = ((dist >= 0) & (dist < window)).view(1, 1, 1, Tq, Tk)
    if key_mask is not None:
        allowed = allowed & (key_mask != 0).view(B, 1, 1, 1, Tk)
    scores = scores.masked_fill(~allowed, float("-inf"))
    if sink_logits is not None:
        sinks = sink_logits.to(acc).view(1, H_kv, G, 1, -1).expand(B, H_kv, G, Tq, -1)
        scores = torch.cat([scores, sinks], dim=-1)  # sinks join the denominator only
    row_max = scores.amax(dim=-1, keepdim=True) if return_mass else scores.detach().amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    weights = torch.exp(scores - row_max)
    mass = weights.sum(dim=-1, keepdim=True)
    probs = (weights / torch.where(mass > 0, mass, torch.ones_like(mass)))[..., :Tk]
    out = probs.view(B, H_kv, G * Tq, Tk) @ vf  # [B, H_kv, G*Tq, D]
    out = out.view(B, H, Tq, D).transpose(1, 2).to(q.dtype)
    return (out, mass.view(B, H, Tq).transpose(1, 2)) if return_mass else out
