"""Blocked causal sliding-window softmax attention (the fast CPU path), O(T * window) time and memory.

Queries are cut into blocks of ``C`` positions; block ``i`` attends the keys of blocks ``i - P .. i`` where
``P = ceil((window - 1) / C)`` previous blocks cover the window. The key bands are built once for all blocks (left
pad by ``P * C``, ``unfold`` with size ``(P + 1) * C`` and step ``C``), so every block is one batched matmul and the
backward pass is plain autograd. Semantics match :func:`naive_sliding_window_attention`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .naive import sequence_ids, validate_sliding_window_inputs

__all__ = ["chunk_sliding_window_attention", "default_chunk_size"]


def default_chunk_size(window: int, T: int) -> int:
    """``max(window, 64)`` rounded up to a multiple of 64, never more than T (one block then covers everything)."""
    size = -(-max(window, 64) // 64) * 64
    return max(1, min(size, T))


def _bands(x: torch.Tensor, pad_left: int, pad_right: int, size: int, step: int) -> torch.Tensor:
    """``x [B, T, ...]`` -> ``[B, n, size, ...]`` overlapping windows along time (left/right zero padded)."""
    trailing = x.dim() - 2
    x = F.pad(x, (0, 0) * trailing + (pad_left, pad_right))
    bands = x.unfold(1, size, step)  # [B, n, ..., size]
    return bands.movedim(-1, 2)


def fused_chunk_size(window: int) -> int:
    """Block length for the fused path: a quarter of the window rounded up to a power of two, within [64, 256]
    (a CPU sweep, T 2K-8K, windows 64-512: smaller blocks waste fewer scores, larger ones make fewer calls)."""
    return min(256, max(64, 1 << max(0, (window - 1).bit_length() - 2)))


def _band_mask(B, T, n, C, L, left, window, attention_mask, cu_seqlens, device) -> torch.Tensor:
    """``[B or 1, n, C, L]`` bool: query i of block b may attend key j of its band (window, padding, sequences)."""
    i = torch.arange(C, device=device)
    j = torch.arange(L, device=device)
    dist = (i[:, None] + left) - j[None, :]  # query i of a block, key j of its band -> distance in [0, window)
    allowed = ((dist >= 0) & (dist < window)).view(1, 1, C, L)
    right = n * C - T
    # Per-key validity (left padding of the band, attention_mask) and packed-sequence ids, banded like the keys.
    if left > 0 or attention_mask is not None:
        key_valid = torch.ones(B, T, dtype=torch.bool, device=device) if attention_mask is None else attention_mask != 0
        kv_band = _bands(key_valid[..., None].to(torch.uint8), left, right, L, C)[..., 0] != 0  # [B, n, L]; pad False
        allowed = allowed & kv_band[:, :, None, :]
    if cu_seqlens is not None:
        seq = sequence_ids(cu_seqlens, T, device)[None]  # [1, T]
        seq_q = F.pad(seq, (0, right), value=-1).view(1, n, C)
        seq_k = _bands((seq + 1)[..., None], left, right, L, C)[..., 0] - 1  # padding -> -1
        allowed = allowed & (seq_q[:, :, :, None] == seq_k[:, :, None, :])  # [1, n, C, L]
    return allowed


def _fused_blocks(qb, kb, vb, allowed, scale, G) -> torch.Tensor:
    """Each (batch, block) is one SDPA call over its key band; rows with no key output 0 (their mask is opened so
    the fused kernel sees no empty row, then the output is zeroed: no NaN forward or backward)."""
    B, n, H_kv, GC, D = qb.shape
    L = kb.shape[3]
    C = GC // G
    mask = allowed.expand(B, n, C, L)
    empty = ~mask.any(dim=-1)  # [B, n, C]; no data-dependent branch, so torch.compile traces one graph
    mask = (mask | empty[..., None])[:, :, None].expand(B, n, G, C, L).reshape(B * n, 1, GC, L)
    out = F.scaled_dot_product_attention(qb.reshape(B * n, H_kv, GC, D), kb.reshape(B * n, H_kv, L, D),
                                         vb.reshape(B * n, H_kv, L, D), attn_mask=mask, scale=scale)
    keep = ~empty[:, :, None, None, :, None].expand(B, n, 1, G, C, 1).reshape(B, n, 1, GC, 1)
    out = torch.where(keep, out.view(B, n, H_kv, GC, D), torch.zeros((), dtype=out.dtype, device=out.device))
    return out


def chunk_sliding_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int,
    sink_logits: torch.Tensor | None = None,
    scale: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    chunk_size: int | None = None,
    return_mass: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Causal sliding-window attention computed block by block; same arguments and result as the naive version
    (``return_mass`` too).

    ``chunk_size`` (block length ``C``, default :func:`default_chunk_size`) trades score-matrix waste (each query
    scores ``(P + 1) * C`` keys) against the number of key-band copies (``P + 1``). Without sinks or the mass, every
    block is one fused ``scaled_dot_product_attention`` call over its key band with a boolean band mask (no score
    tensor in Python, 2-4x faster on CPU than the explicit softmax, which sinks and ``return_mass`` still take).
    """
    scale = validate_sliding_window_inputs(q, k, v, window, sink_logits, scale, cu_seqlens, attention_mask)
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be an int >= 1 or None, got {chunk_size!r}")
    B, T, H, D = q.shape
    H_kv = k.shape[2]
    G = H // H_kv
    device = q.device
    acc = torch.promote_types(q.dtype, torch.float32)  # softmax in fp32 (fp64 stays fp64)
    if T == 0:
        out = q.new_zeros(B, T, H, D)
        return (out, q.new_zeros(B, T, H, dtype=acc)) if return_mass else out

    fused = sink_logits is None and not return_mass
    if chunk_size is None:
        chunk_size = fused_chunk_size(window) if fused else default_chunk_size(window, T)
    C = min(chunk_size, T)
    n = -(-T // C)
    Tp = n * C
    P = min(math.ceil((window - 1) / C), n - 1)  # previous blocks the window reaches into
    L = (P + 1) * C  # keys per block band
    left, right = P * C, Tp - T

    # Queries: [B, n, H_kv, G*C, D] so each kv head is one batched matmul over its G query heads.
    qb = F.pad(q.to(acc), (0, 0, 0, 0, 0, right)).view(B, n, C, H_kv, G, D)
    qb = qb.permute(0, 1, 3, 4, 2, 5).reshape(B, n, H_kv, G * C, D)
    kb = _bands(k.to(acc), left, right, L, C).permute(0, 1, 3, 2, 4)  # [B, n, H_kv, L, D]
    vb = _bands(v.to(acc), left, right, L, C).permute(0, 1, 3, 2, 4)
    allowed = _band_mask(B, T, n, C, L, left, window, attention_mask, cu_seqlens, device)  # [B or 1, n, C, L]

    if fused:
        out = _fused_blocks(qb, kb, vb, allowed, scale, G)  # [B, n, H_kv, G*C, D]
        return out.view(B, n, H_kv, G, C, D).permute(0, 1, 4, 2, 3, 5).reshape(B, Tp, H, D)[:, :T].to(q.dtype)

    scores = torch.matmul(qb, kb.transpose(-1, -2)) * scale  # [B, n, H_kv, G*C, L]
    scores = scores.view(B, n, H_kv, G, C, L)
    allowed = allowed[:, :, None, None]  # [B or 1, n or 1, 1, 1, C, L]
    scores = scores.masked_fill(~allowed, float("-inf"))

    # The row max only stabilises exp() and cancels from the output; the mass keeps it (its gradient follows).
    row_max = scores.amax(dim=-1) if return_mass else scores.detach().amax(dim=-1)  # [B, n, H_kv, G, C]
    if sink_logits is not None:
        sinks = sink_logits.to(acc).view(H_kv, G, 1, -1)  # [H_kv, G, 1, S]
        sink_max = sinks.amax(dim=-1) if return_mass else sinks.detach().amax(dim=-1)
        row_max = torch.maximum(row_max, sink_max)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    weights = torch.exp(scores - row_max[..., None])
    mass = weights.sum(dim=-1)
    if sink_logits is not None:
        mass = mass + torch.exp(sinks - row_max[..., None]).sum(dim=-1)
    denom = torch.where(mass > 0, mass, torch.ones_like(mass))  # empty row -> output 0

    out = torch.matmul(weights.view(B, n, H_kv, G * C, L), vb)  # [B, n, H_kv, G*C, D]
    out = out.view(B, n, H_kv, G, C, D) / denom[..., None]
    out = out.permute(0, 1, 4, 2, 3, 5).reshape(B, Tp, H, D)[:, :T].to(q.dtype)
    if not return_mass:
        return out
    return out, mass.permute(0, 1, 4, 2, 3).reshape(B, Tp, H)[:, :T]
