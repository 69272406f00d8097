"""Block-sparse causal attention, one query block at a time (the PyTorch CPU path), O(T · block_size) memory a step.

For query block ``i`` only its selected causal key blocks (``block_mask[b, h, i, j]``, ``j <= i``) are gathered:
their indices come first in ascending order after a stable sort, padded to the largest count ``K_i`` over
(batch, head) with slots that are masked out. Scores are ``[B, H, block, K_i · block]``, never ``[T, T]``; the backward
pass is plain autograd (the gathers scatter-add back into k and v). Semantics match
:func:`naive_block_sparse_attention`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .naive import _softmax_rows, num_blocks, token_mask, validate_block_sparse_inputs

__all__ = ["chunk_block_sparse_attention", "selected_blocks"]


def selected_blocks(selected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``selected [..., N]`` bool -> ``(indices [..., N], counts [...])``: selected positions first, ascending.

    A stable sort of ``not selected`` keeps the selected indices in order; entries past the count are unused.
    """
    order = torch.argsort((~selected).to(torch.int8), dim=-1, stable=True)
    return order, selected.sum(dim=-1)


def chunk_block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: torch.Tensor,
    block_size: int,
    scale: float | None = None,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Block-sparse causal attention computed query block by query block; same arguments and result as the naive one.

    q ``[B, T, H, D]``, k/v ``[B, T, H_kv, D]``, block_mask bool ``[B, H, N, N]`` (``N = ceil(T / block_size)``),
    attention_mask ``[B, T]`` or None. Returns ``[B, T, H, D]`` in q's dtype; differentiable in q, k, v.
    """
    scale = validate_block_sparse_inputs(q, k, v, block_mask, block_size, scale, attention_mask)
    B, T, H, D = q.shape
    H_kv = k.shape[2]
    device = q.device
    acc = torch.promote_types(q.dtype, torch.float32)
    if T == 0:
        return q.new_zeros(B, T, H, D)
    bs = block_size
    n = num_blocks(T, bs)
    pad = n * bs - T

    # Keys / values as [B, H_kv, N, bs, D] so a (batch, head, block index) triple gathers one block.
    kb = F.pad(k.to(acc), (0, 0, 0, 0, 0, pad)).view(B, n, bs, H_kv, D).permute(0, 3, 1, 2, 4)
    vb = F.pad(v.to(acc), (0, 0, 0, 0, 0, pad)).view(B, n, bs, H_kv, D).permute(0, 3, 1, 2, 4)
    key_real = token_mask(attention_mask, B, T, device)
    key_real = F.pad(key_real, (0, pad), value=False).view(B, n, bs)  # positions past T are never keys

    causal = torch.ones(n, n, dtype=torch.bool, device=device).tril()
    indices, counts = selected_blocks(block_mask & causal)  # [B, H, N, N], [B, H, N]
    b_idx = torch.arange(B, device=device)[:, None, None]
    kv_head = (torch.arange(H, device=device) // (H // H_kv))[None, :, None]
    offs = torch.arange(bs, device=device)

    outputs = []
    for i in range(n):
        start, stop = i * bs, min((i + 1) * bs, T)
        rows = stop - start
        # At least one (then unused) slot: a block selecting nothing still flows through the masked softmax (zeros)
        # and stays connected to autograd.
        # A traced graph cannot size by the count: it takes every causal block (the unselected ones masked).
        width = i + 1 if torch.compiler.is_compiling() else max(int(counts[:, :, i].max()), 1)
        idx = indices[:, :, i, :width]  # [B, H, K]
        slot_used = torch.arange(width, device=device) < counts[:, :, i, None]  # [B, H, K]
        keys = kb[b_idx, kv_head, idx].reshape(B, H, width * bs, D)
        values = vb[b_idx, kv_head, idx].reshape(B, H, width * bs, D)
        key_pos = (idx[..., None] * bs + offs).reshape(B, H, width * bs)
        key_ok = (slot_used[..., None] & key_real[b_idx, idx]).reshape(B, H, width * bs)

        qi = q[:, start:stop].to(acc).transpose(1, 2)  # [B, H, rows, D]
        scores = torch.matmul(qi, keys.transpose(-1, -2)) * scale  # [B, H, rows, K * bs]
        query_pos = torch.arange(start, stop, device=device)
        allowed = key_ok[:, :, None, :] & (key_pos[:, :, None, :] <= query_pos[:, None])
        probs = _softmax_rows(scores.masked_fill(~allowed, float("-inf")))
        outputs.append(torch.matmul(probs, values).transpose(1, 2))  # [B, rows, H, D]
    return torch.cat(outputs, dim=1).to(q.dtype)
