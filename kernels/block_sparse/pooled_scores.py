"""Block-pooled causal attention probabilities without the ``[T, T]`` map: one query block at a time.

Each step scores one query block against its causal key prefix (``[B, H, block, ≤ T]``), takes the exact row
softmax there (a row's keys all lie in that prefix), and pools it into the block's row of tiles. Same result as
:func:`naive_pooled_attention_scores`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .naive import _softmax_rows, num_blocks, pool_and_normalise, token_mask, validate_pooled_inputs

__all__ = ["chunk_pooled_attention_scores"]


@torch.no_grad()
def chunk_pooled_attention_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    block_size: int,
    scale: float | None = None,
    attention_mask: torch.Tensor | None = None,
    pool: str = "max",
) -> torch.Tensor:
    """``[B, H, N, N]`` fp32 pooled attention (``pool`` "max" or "mean"), rows renormalised over causal key blocks.

    q ``[B, T, H, D]``, k ``[B, T, H_kv, D]``, attention_mask ``[B, T]`` or None. A training target: no gradient.
    """
    scale = validate_pooled_inputs(q, k, block_size, scale, attention_mask, pool)
    B, T, H, _ = q.shape
    group = H // k.shape[2]
    device = q.device
    acc = torch.promote_types(q.dtype, torch.float32)
    bs = block_size
    n = num_blocks(T, bs)
    tiles = torch.zeros(B, H, n, n, dtype=torch.float32, device=device)
    real = token_mask(attention_mask, B, T, device)

    for i in range(n):
        start, stop = i * bs, min((i + 1) * bs, T)
        prefix = stop  # causal: this block's queries see keys [0, stop)
        qi = q[:, start:stop].to(acc).transpose(1, 2)  # [B, H, rows, D]
        keys = k[:, :prefix].to(acc).repeat_interleave(group, dim=2).transpose(1, 2)  # [B, H, prefix, D]
        scores = torch.matmul(qi, keys.transpose(-1, -2)) * scale
        query_pos = torch.arange(start, stop, device=device)
        allowed = (torch.arange(prefix, device=device) <= query_pos[:, None])[None, None]
        allowed = allowed & real[:, None, None, :prefix]
        probs = _softmax_rows(scores.masked_fill(~allowed, float("-inf"))).float()
        query_real = real[:, start:stop]
        probs = probs * query_real[:, None, :, None]  # padded query rows take no part
        probs = F.pad(probs, (0, (i + 1) * bs - prefix)).view(B, H, stop - start, i + 1, bs)
        if pool == "max":
            tiles[:, :, i, : i + 1] = probs.amax(dim=(2, 4))
        else:
            rows = query_real.sum(-1).clamp_min(1)  # [B]
            tiles[:, :, i, : i + 1] = probs.sum(dim=4).sum(dim=2) / rows[:, None, None]
    return pool_and_normalise(tiles, n)
