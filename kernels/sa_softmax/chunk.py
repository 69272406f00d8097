"""Causal SA-Softmax attention one query block at a time (the PyTorch CPU path).

Query block ``[start, stop)`` only sees keys ``[0, stop)``, so a step builds ``[B, H, rows, stop]`` scores, never
the ``[T, T]`` map for every query at once (peak memory O(CHUNK_SIZE * T) per head). The weights come from the same
helper as the naive spec, so both share the tie / epsilon conventions documented there; the backward pass is
plain autograd. Semantics match :func:`naive_sa_softmax_attention`.
"""

from __future__ import annotations

import torch

from .naive import sa_softmax_weights, validate_sa_softmax_inputs

__all__ = ["CHUNK_SIZE", "chunk_sa_softmax_attention"]

# Query rows per step (tests shrink it to cover several blocks on tiny inputs).
CHUNK_SIZE = 64


def chunk_sa_softmax_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    mode: str = "plain",
    scale: float | None = None,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal SA-Softmax attention computed query block by query block; same arguments and result as the naive one.

    q ``[B, T, H, D]``, k/v ``[B, T, H_kv, D]``, ``mode`` in ``("plain", "normalized")``, scale (default
    ``D ** -0.5``), attention_mask ``[B, T]`` or None. Full causal self-attention only (no decode against a longer
    key prefix). Returns ``[B, T, H, D]`` in q's dtype; differentiable in q, k, v.
    """
    scale = validate_sa_softmax_inputs(q, k, v, mode, scale, attention_mask)
    B, T, H, D = q.shape
    if T == 0:
        return q.new_zeros(B, T, H, D)
    group = H // k.shape[2]
    acc = torch.promote_types(q.dtype, torch.float32)
    device = q.device
    # GQA: view q as [B, H_kv, group, T, D] so a kv head serves its group without copying k / v per q head.
    qf = q.to(acc).view(B, T, k.shape[2], group, D).permute(0, 2, 3, 1, 4)
    kf = k.to(acc).permute(0, 2, 1, 3)[:, :, None]  # [B, H_kv, 1, T, D]
    vf = v.to(acc).permute(0, 2, 1, 3)[:, :, None]
    key_real = None if attention_mask is None else (attention_mask != 0)[:, None, None, None, :]  # [B, 1, 1, 1, T]

    step = max(1, int(CHUNK_SIZE))
    outputs = []
    for start in range(0, T, step):
        stop = min(start + step, T)
        scores = torch.matmul(qf[:, :, :, start:stop], kf[..., :stop, :].transpose(-1, -2)) * scale
        rows = torch.arange(start, stop, device=device)
        allowed = torch.arange(stop, device=device)[None, :] <= rows[:, None]  # [rows, stop]
        if key_real is not None:
            allowed = allowed & key_real[..., :stop]
        weights = sa_softmax_weights(scores, allowed, mode)  # [B, H_kv, group, rows, stop]
        outputs.append(torch.matmul(weights, vf[..., :stop, :]))
    o = torch.cat(outputs, dim=3)  # [B, H_kv, group, T, D]
    return o.permute(0, 3, 1, 2, 4).reshape(B, T, H, D).to(q.dtype)
