"""Reference block-sparse causal softmax attention and block-pooled attention scores (SeerAttention-style).

A gate picks, per (batch, head, query block), the key blocks each query block attends to. With ``N = ceil(T / bs)``
blocks of ``bs`` positions (the last may be partial), ``block_mask [B, H, N, N]`` (bool) lets query block ``i``
attend key block ``j`` only where ``block_mask[b, h, i, j]`` and ``j <= i``; inside the chosen blocks the usual
causal rule ``s <= t`` holds and padding keys (``attention_mask == 0``) are never attended. Softmax runs in fp32,
the output has q's dtype, and a query row with no attendable key outputs 0.

:func:`naive_pooled_attention_scores` is the gate's distillation target: the dense causal attention probabilities
pooled over (query block, key block) tiles and renormalised over the causal key blocks of each query block.

This module builds the full ``[T, T]`` maps: it is the specification, not the fast path.
"""

from __future__ import annotations

import torch

from ..attention_checks import causal_key_mask, check_attention_mask, check_qkv, resolve_scale
from ..varlen import shape_of

__all__ = ["naive_block_sparse_attention", "naive_pooled_attention_scores", "num_blocks"]

POOL_MODES = ("max", "mean")


def num_blocks(T: int, block_size: int) -> int:
    """``ceil(T / block_size)``: query (and key) blocks covering T positions."""
    return -(-T // block_size)


def _validate_common(q, k, v, block_size, scale, attention_mask) -> float:
    """Checks shared by the attention and the pooled-score ops (``v=None`` for the latter); return the scale."""
    check_qkv(q, k, v)
    B, T, _, D = q.shape
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be an int >= 1, got {block_size!r}")
    check_attention_mask(attention_mask, B, T, q.device)
    return resolve_scale(scale, D)


def validate_block_sparse_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: torch.Tensor,
    block_size: int,
    scale: float | None,
    attention_mask: torch.Tensor | None,
) -> float:
    """Raise ``ValueError`` naming the offending tensor/field; return the effective scale."""
    scale = _validate_common(q, k, v, block_size, scale, attention_mask)
    B, T, H, _ = q.shape
    n = num_blocks(T, block_size)
    if not isinstance(block_mask, torch.Tensor):
        raise ValueError(f"block_mask must be a bool torch.Tensor [B, H, Nq, Nk], got {type(block_mask).__name__}")
    if block_mask.dtype != torch.bool:
        raise ValueError(f"block_mask must have dtype torch.bool, got {block_mask.dtype}")
    if shape_of(block_mask) != (B, H, n, n):
        raise ValueError(
            f"block_mask must have shape [B, H, Nq, Nk] = {(B, H, n, n)} (Nq = Nk = ceil(T={T} / block_size="
            f"{block_size})), got {shape_of(block_mask)}"
        )
    if block_mask.device != q.device:
        raise ValueError(f"block_mask must be on q's device {q.device}, got {block_mask.device}")
    return scale


def validate_pooled_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    block_size: int,
    scale: float | None,
    attention_mask: torch.Tensor | None,
    pool: str,
) -> float:
    """Raise ``ValueError`` naming the offending tensor/field; return the effective scale."""
    scale = _validate_common(q, k, None, block_size, scale, attention_mask)
    if pool not in POOL_MODES:
        raise ValueError(f"pool must be one of {POOL_MODES}, got {pool!r}")
    return scale


def token_mask(attention_mask: torch.Tensor | None, B: int, T: int, device: torch.device) -> torch.Tensor:
    """``[B, T]`` bool, True at real tokens: one rule for the naive, chunked and pooled paths (None = all real)."""
    if attention_mask is None:
        return torch.ones(B, T, dtype=torch.bool, device=device)
    return attention_mask != 0


def _softmax_rows(scores: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim where rows that are all ``-inf`` give all zeros (not NaN, also in the backward)."""
    row_max = scores.detach().amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    weights = torch.exp(scores - row_max)
    denom = weights.sum(dim=-1, keepdim=True)
    return weights / torch.where(denom > 0, denom, torch.ones_like(denom))


def _dense_scores(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """``[B, H, T, T]`` scores in fp32 (fp64 stays fp64), kv heads repeated for GQA."""
    acc = torch.promote_types(q.dtype, torch.float32)
    group = q.shape[2] // k.shape[2]
    qf = q.to(acc).transpose(1, 2)
    kf = k.to(acc).repeat_interleave(group, dim=2).transpose(1, 2)
    return torch.matmul(qf, kf.transpose(-1, -2)) * scale


def block_sparse_attention_weights(q: torch.Tensor, k: torch.Tensor, block_mask: torch.Tensor, block_size: int,
                                   scale: float, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The ``[B, H, T, T]`` probabilities of block-sparse causal attention (fp32 or wider; what
    ``output_attentions`` returns): softmax over the keys in selected blocks, causal and not padding."""
    T = q.shape[1]
    scores = _dense_scores(q, k, scale)  # [B, H, T, T]
    # Block mask -> per-position mask: query t is in block t // bs, key s in block s // bs.
    block_of = torch.arange(T, device=q.device) // block_size
    allowed = block_mask[:, :, block_of][:, :, :, block_of]  # [B, H, T, T]
    allowed = allowed & causal_key_mask(T, attention_mask, q.device)
    return _softmax_rows(scores.masked_fill(~allowed, float("-inf")))


def naive_block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: torch.Tensor,
    block_size: int,
    scale: float | None = None,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Block-sparse causal attention via the full ``[T, T]`` masked score matrix.

    q ``[B, T, H, D]``, k/v ``[B, T, H_kv, D]`` (q head ``h`` uses kv head ``h // (H // H_kv)``), block_mask bool
    ``[B, H, N, N]`` with ``N = ceil(T / block_size)``, attention_mask ``[B, T]`` (1 = token, 0 = padding) or None.
    Returns ``[B, T, H, D]`` in q's dtype.
    """
    scale = validate_block_sparse_inputs(q, k, v, block_mask, block_size, scale, attention_mask)
    group = q.shape[2] // k.shape[2]
    acc = torch.promote_types(q.dtype, torch.float32)
    probs = block_sparse_attention_weights(q, k, block_mask, block_size, scale, attention_mask)
    vf = v.to(acc).repeat_interleave(group, dim=2).transpose(1, 2)
    out = torch.matmul(probs, vf)  # [B, H, T, D]
    return out.transpose(1, 2).to(q.dtype)


def pool_and_normalise(tiles: torch.Tensor, n: int) -> torch.Tensor:
    """Zero the non-causal tiles (key block > query block) of ``[B, H, n, n]`` and renormalise each row to sum 1."""
    causal = torch.ones(n, n, dtype=torch.bool, device=tiles.device).tril()
    tiles = tiles.masked_fill(~causal, 0.0)
    total = tiles.sum(dim=-1, keepdim=True)
    return tiles / torch.where(total > 0, total, torch.ones_like(total))


@torch.no_grad()
def naive_pooled_attention_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    block_size: int,
    scale: float | None = None,
    attention_mask: torch.Tensor | None = None,
    pool: str = "max",
) -> torch.Tensor:
    """Dense causal attention probabilities pooled per (query block, key block) tile: ``[B, H, N, N]`` fp32.

    ``pool="max"``: the largest probability in the tile. ``pool="mean"``: each query row's probability mass on the
    tile's keys, averaged over the tile's real query rows. Padded query rows (``attention_mask == 0``) are left out.
    Non-causal tiles are zeroed and each row renormalised to sum 1 (a row with nothing stays 0). A training target:
    computed without gradient.
    """
    scale = validate_pooled_inputs(q, k, block_size, scale, attention_mask, pool)
    B, T, H, _ = q.shape
    n = num_blocks(T, block_size)
    pad = n * block_size - T
    scores = _dense_scores(q, k, scale).float()
    probs = _softmax_rows(scores.masked_fill(~causal_key_mask(T, attention_mask, q.device), float("-inf")))

    query_real = token_mask(attention_mask, B, T, q.device)
    probs = probs * query_real[:, None, :, None]  # padded query rows take no part
    probs = torch.nn.functional.pad(probs, (0, pad, 0, pad)).view(B, H, n, block_size, n, block_size)
    if pool == "max":
        tiles = probs.amax(dim=(3, 5))
    else:
        rows = torch.nn.functional.pad(query_real, (0, pad)).view(B, n, block_size).sum(-1)  # real rows per block
        tiles = probs.sum(dim=5).sum(dim=3) / rows.clamp_min(1)[:, None, :, None]
    return pool_and_normalise(tiles, n)
