"""Reference causal sliding-window softmax attention with optional learnable sink logits.

Query ``t`` attends keys ``s`` with ``t - window < s <= t`` (same packed sequence, key not padding). Sink logits
``[H, S]`` join the softmax denominator only: they take probability mass but contribute nothing to the output, so a
head can "attend to nowhere" (Lizard's meta-memory). Softmax runs in fp32; the output has the input dtype. A query
row with no attendable key and no sink outputs 0.

This module builds the full ``[T, T]`` score matrix: it is the specification, not the fast path.
"""

from __future__ import annotations

import torch

from ..attention_checks import check_attention_mask, check_qkv, resolve_scale
from ..varlen import parse_cu_seqlens, shape_of

__all__ = ["naive_sliding_window_attention"]



def validate_sliding_window_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int,
    sink_logits: torch.Tensor | None,
    scale: float | None,
    cu_seqlens: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
) -> float:
    """Raise ``ValueError`` naming the offending tensor/field; return the effective scale."""
    check_qkv(q, k, v)
    B, T, H, D = q.shape
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be an int >= 1, got {window!r}")
    if sink_logits is not None:
        if not isinstance(sink_logits, torch.Tensor) or not sink_logits.is_floating_point():
            raise ValueError("sink_logits must be a floating tensor of shape [H, S]")
        if sink_logits.dim() != 2 or sink_logits.shape[0] != H or sink_logits.shape[1] < 1:
            raise ValueError(f"sink_logits must have shape [H={H}, S>=1], got {shape_of(sink_logits)}")
        if sink_logits.device != q.device:
            raise ValueError(f"sink_logits must be on {q.device}, got {sink_logits.device}")
    check_attention_mask(attention_mask, B, T)  # no device check: the Triton path moves the mask to q's device
    parse_cu_seqlens(cu_seqlens, B, T, shape_of(q))
    return resolve_scale(scale, D)


def sequence_ids(cu_seqlens: torch.Tensor, T: int, device: torch.device) -> torch.Tensor:
    """``[T]`` index of the packed sequence each position belongs to."""
    boundaries = cu_seqlens.to(device=device, dtype=torch.long)[1:]
    return torch.bucketize(torch.arange(T, device=device), boundaries, right=True)


def naive_sliding_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int,
    sink_logits: torch.Tensor | None = None,
    scale: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    return_mass: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Causal sliding-window attention via the full ``[T, T]`` masked score matrix.

    q ``[B, T, H, D]``, k/v ``[B, T, H_kv, D]`` (q head ``h`` uses kv head ``h // (H // H_kv)``), ``window >= 1``,
    sink_logits ``[H, S]`` or None, cu_seqlens ``[N + 1]`` (B == 1) or None, attention_mask ``[B, T]`` (1 = token,
    0 = padding) or None. Returns ``[B, T, H, D]`` in q's dtype; with ``return_mass`` also each row's
    ``Σ exp(score - row max)`` ``[B, T, H]`` (fp32, sinks included, 0 for an empty row), the row max taking part in
    autograd: LoLCATs' hybrid shares this denominator with its linear terms.
    """
    scale = validate_sliding_window_inputs(q, k, v, window, sink_logits, scale, cu_seqlens, attention_mask)
    B, T, H, D = q.shape
    group = H // k.shape[2]
    device = q.device
    acc = torch.promote_types(q.dtype, torch.float32)  # softmax in fp32 (fp64 stays fp64)

    qf = q.to(acc).transpose(1, 2)  # [B, H, T, D]
    kf = k.to(acc).repeat_interleave(group, dim=2).transpose(1, 2)
    vf = v.to(acc).repeat_interleave(group, dim=2).transpose(1, 2)
    scores = torch.matmul(qf, kf.transpose(-1, -2)) * scale  # [B, H, T, T]

    t = torch.arange(T, device=device)
    dist = t[:, None] - t[None, :]
    allowed = ((dist >= 0) & (dist < window))[None, None]  # [1, 1, T, T]
    if cu_seqlens is not None:
        seq = sequence_ids(cu_seqlens, T, device)
        allowed = allowed & (seq[:, None] == seq[None, :])[None, None]
    if attention_mask is not None:
        allowed = allowed & (attention_mask != 0)[:, None, None, :]
    scores = scores.masked_fill(~allowed, float("-inf"))

    if sink_logits is not None:
        sinks = sink_logits.to(acc)[None, :, None, :].expand(B, H, T, sink_logits.shape[1])
        scores = torch.cat([scores, sinks], dim=-1)  # sinks join the denominator only

    row_max = scores.amax(dim=-1, keepdim=True) if return_mass else scores.detach().amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    weights = torch.exp(scores - row_max)
    mass = weights.sum(dim=-1, keepdim=True)
    denom = torch.where(mass > 0, mass, torch.ones_like(mass))  # empty row -> output 0
    probs = (weights / denom)[..., :T]
    out = torch.matmul(probs, vf).transpose(1, 2).to(q.dtype)  # [B, T, H, D]
    return (out, mass[..., 0].transpose(1, 2)) if return_mass else out
