"""SA-Softmax attention of the newest queries over a longer key sequence (decode steps against a cache).

The fused kernels take queries and keys at the same positions; a decode step has ``T_q`` new queries at the end of
``S >= T_q`` cached keys. Few queries, so the ``[T_q, S]`` weight matrix is small and plain PyTorch is the right
tool. Same weights as :func:`sa_softmax_weights`, causal by absolute position.
"""

from __future__ import annotations

import torch

from .naive import sa_softmax_weights

__all__ = ["sa_softmax_attention_over_cache"]


def sa_softmax_attention_over_cache(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, mode: str = "plain",
                                    scale: float | None = None,
                                    attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """q ``[B, T_q, H, D]`` (the last ``T_q`` positions), k/v ``[B, S, H_kv, D]``, attention_mask ``[B, S]`` or None
    → ``[B, T_q, H, D]`` in q's dtype."""
    B, Tq, H, D = q.shape
    S, H_kv = k.shape[1], k.shape[2]
    if S < Tq:
        raise ValueError(f"k/v hold {S} positions, fewer than the {Tq} queries (q {tuple(q.shape)}, k {tuple(k.shape)})")
    scale = D ** -0.5 if scale is None else scale
    groups = H // H_kv
    qf = q.float().transpose(1, 2)  # [B, H, Tq, D]
    kf = k.float().transpose(1, 2).repeat_interleave(groups, dim=1)
    vf = v.float().transpose(1, 2).repeat_interleave(groups, dim=1)
    scores = torch.matmul(qf, kf.transpose(-1, -2)) * scale  # [B, H, Tq, S]
    query_pos = torch.arange(S - Tq, S, device=q.device)[:, None]
    allowed = (torch.arange(S, device=q.device)[None, :] <= query_pos)[None, None]
    if attention_mask is not None:
        allowed = allowed & attention_mask[:, None, None, :S].to(torch.bool)
    weights = sa_softmax_weights(scores, allowed, mode)
    return torch.matmul(weights, vf).transpose(1, 2).to(q.dtype)
