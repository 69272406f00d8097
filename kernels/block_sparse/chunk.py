"""Block-sparse causal attention on CPU: fused SDPA calls over gathered key blocks, cost in proportion to the density.

Every (batch, head, query block) row selects its causal key blocks (``block_mask[b, h, i, j]``, ``j <= i``); their
indices come first in ascending order after a stable sort. Rows are grouped by how many blocks they select, each
group padded to one width from a short geometric ladder (1, 2, 3, 4, 6, 8, 12, ...: at most 1.5x padding), and each
group is one ``scaled_dot_product_attention`` call over ``[rows, block, width · block]`` with a boolean mask (causal
inside the diagonal block, padding slots and padded keys off). No Python loop over query blocks and no ``[T, T]``
scores; the backward pass is autograd through the gathers. Semantics match :func:`naive_block_sparse_attention`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .naive import num_blocks, token_mask, validate_block_sparse_inputs

__all__ = ["chunk_block_sparse_attention", "selected_blocks", "width_ladder"]


def selected_blocks(selected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``selected [..., N]`` bool -> ``(indices [..., N], counts [...])``: selected positions first, ascending.

    A stable sort of ``not selected`` keeps the selected indices in order; entries past the count are unused.
    """
    order = torch.argsort((~selected).to(torch.int8), dim=-1, stable=True)
    return order, selected.sum(dim=-1)


def width_ladder(n: int) -> list[int]:
    """Group widths up to ``n``: powers of two and their halfway points (1, 2, 3, 4, 6, 8, 12, 16, ...), then n."""
    widths, power = [1], 2
    while power < n:
        widths += [w for w in (power, power + power // 2) if w < n]
        power *= 2
    return sorted(set(widths + [n]))


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
    G = H // H_kv

    # Blocks as flat rows: queries [(B·H·N), bs, D]; keys / values [(B·H_kv·N), bs, D].
    qb = F.pad(q.to(acc), (0, 0, 0, 0, 0, pad)).view(B, n, bs, H, D).permute(0, 3, 1, 2, 4).reshape(B * H * n, bs, D)
    kb = F.pad(k.to(acc), (0, 0, 0, 0, 0, pad)).view(B, n, bs, H_kv, D).permute(0, 3, 1, 2, 4).reshape(-1, bs, D)
    vb = F.pad(v.to(acc), (0, 0, 0, 0, 0, pad)).view(B, n, bs, H_kv, D).permute(0, 3, 1, 2, 4).reshape(-1, bs, D)
    key_real = F.pad(token_mask(attention_mask, B, T, device), (0, pad), value=False).view(B, n, bs)

    causal = torch.ones(n, n, dtype=torch.bool, device=device).tril()
    indices, counts = selected_blocks(block_mask & causal)  # [B, H, N, N], [B, H, N]
    indices, counts = indices.reshape(B * H * n, n), counts.reshape(B * H * n)
    row = torch.arange(B * H * n, device=device)
    batch, head, qblock = row // (H * n), (row // n) % H, row % n
    kv_row_base = (batch * H_kv + head // G) * n  # + key block index -> row of kb / vb
    offs = torch.arange(bs, device=device)

    # Rows grouped by the ladder width that holds their count (a traced graph cannot size by the counts: one group
    # of every causal block, the unselected ones masked).
    if torch.compiler.is_compiling():
        groups = [(n, row)]
    else:
        ladder = torch.tensor(width_ladder(n), device=device)
        rung = torch.searchsorted(ladder, counts.clamp(min=1))
        groups = [(int(ladder[r]), torch.nonzero(rung == r).flatten()) for r in torch.unique(rung).tolist()]

    outputs, order = [], []
    for width, rows in groups:
        idx = indices[rows, :width]  # [R, W] key block indices, selected first
        slot_used = torch.arange(width, device=device) < counts[rows, None]
        keys = kb[kv_row_base[rows, None] + idx].reshape(len(rows), width * bs, D)
        values = vb[kv_row_base[rows, None] + idx].reshape(len(rows), width * bs, D)
        key_pos = (idx[..., None] * bs + offs).reshape(len(rows), width * bs)
        key_ok = (slot_used[..., None] & key_real[batch[rows, None], idx]).reshape(len(rows), width * bs)
        query_pos = qblock[rows, None] * bs + offs  # [R, bs]
        allowed = key_ok[:, None, :] & (key_pos[:, None, :] <= query_pos[:, :, None])  # [R, bs, W·bs]
        # A row with no attendable key outputs 0: its mask is opened for the fused kernel, then the output zeroed.
        empty = ~allowed.any(dim=-1, keepdim=True)  # [R, bs, 1]
        out = F.scaled_dot_product_attention(qb[rows, None], keys[:, None], values[:, None],
                                             attn_mask=(allowed | empty)[:, None], scale=scale)[:, 0]
        outputs.append(torch.where(empty, torch.zeros((), dtype=out.dtype, device=device), out))
        order.append(rows)
    order = torch.cat(order)
    out = torch.cat(outputs)[torch.argsort(order)]  # back to (batch, head, block) order
    out = out.view(B, H, n * bs, D)[:, :, :T].transpose(1, 2)
    return out.to(q.dtype)
