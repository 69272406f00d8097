"""Block-sparse causal attention on CPU: fused SDPA calls over gathered key blocks, cost in proportion to the density.

Every (batch, head, query block) row selects its causal key blocks (``block_mask[b, h, i, j]``, ``j <= i``), the
diagonal block first, then the others ascending. Rows are grouped by how many blocks they select, each group padded
to one width from a short geometric ladder (1, 2, 3, 4, 6, 8, 12, ...: at most 1.5x padding), and each group is one
``scaled_dot_product_attention`` call over ``[rows, block, width · block]`` with an additive mask built from two
small pieces (per key: padding slots and padded tokens; per group: causal inside the diagonal block at slot 0). No Python loop over query blocks and no ``[T, T]``
scores; the backward pass is autograd through the gathers. Semantics match :func:`naive_block_sparse_attention`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .naive import num_blocks, token_mask, validate_block_sparse_inputs
from .split_flash import split_flash_block_sparse

__all__ = ["chunk_block_sparse_attention", "diagonal_first", "selected_blocks", "width_ladder"]


def selected_blocks(selected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``selected [..., N]`` bool -> ``(indices [..., N], counts [...])``: selected positions first, ascending.

    A stable sort of ``not selected`` keeps the selected indices in order; entries past the count are unused.
    """
    order = torch.argsort((~selected).to(torch.int8), dim=-1, stable=True)
    return order, selected.sum(dim=-1)


def diagonal_first(selected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Like :func:`selected_blocks` for ``selected [..., N, N]`` (query block, key block), but each row's diagonal
    block comes first when selected (then the others ascending): the causal part of a row's mask sits at slot 0."""
    n = selected.shape[-1]
    j = torch.arange(n, device=selected.device)
    rank = torch.where(j[None, :] == j[:, None], -1, j[None, :]).expand_as(selected)  # the diagonal ranks first
    rank = torch.where(selected, rank, rank + n + 1)  # unselected blocks after every selected one
    return torch.argsort(rank, dim=-1, stable=True), selected.sum(dim=-1)


def _split_flash_applies(q: torch.Tensor, attention_mask: torch.Tensor | None) -> bool:
    """The merged-flash path (:mod:`.split_flash`) runs eager CPU calls without key padding."""
    return (q.device.type == "cpu" and not torch.compiler.is_compiling()
            and (attention_mask is None or bool(attention_mask.all())))


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
    selected = block_mask & causal
    indices, counts = diagonal_first(selected)  # [B, H, N, N], [B, H, N]
    has_diagonal = selected.diagonal(dim1=-2, dim2=-1).reshape(B * H * n)
    indices, counts = indices.reshape(B * H * n, n), counts.reshape(B * H * n)
    row = torch.arange(B * H * n, device=device)
    batch, head = row // (H * n), (row // n) % H
    kv_row_base = (batch * H_kv + head // G) * n  # + key block index -> row of kb / vb
    if _split_flash_applies(q, attention_mask):
        out = split_flash_block_sparse(qb, kb, vb, selected.reshape(B * H * n, n), kv_row_base, n, scale)
        return out.view(B, H, n * bs, D)[:, :, :T].transpose(1, 2).to(q.dtype)

    # Rows grouped by (whether the diagonal block is selected, the ladder width that holds their count); a traced
    # graph cannot size by the counts: there, one group of every row and every causal block (unselected ones masked,
    # the diagonal's causal part chosen per row).
    if torch.compiler.is_compiling():
        groups = [(n, None, row)]
    else:
        ladder = torch.tensor(width_ladder(n), device=device)
        rung = torch.searchsorted(ladder, counts.clamp(min=1)) * 2 + (~has_diagonal).long()
        groups = [(int(ladder[r // 2]), r % 2 == 0, torch.nonzero(rung == r).flatten())
                  for r in torch.unique(rung).tolist()]

    # Masks are additive and finite: a masked key adds MASKED (exp underflows to exactly 0) and a row with no key at
    # all stays finite (uniform weights, then zeroed), so neither pass ever sees a NaN.
    masked = -1e30
    in_block = torch.arange(bs, device=device)
    diagonal_penalty = torch.where(in_block[None, :] <= in_block[:, None], 0.0, masked).to(acc)  # [bs (q), bs (k)]

    outputs, order = [], []
    for width, diagonal, rows in groups:
        R = len(rows)
        idx = indices[rows, :width]  # [R, W] key block indices, the diagonal first when selected
        slot_used = torch.arange(width, device=device) < counts[rows, None]
        kv_rows = (kv_row_base[rows, None] + idx).flatten()  # index_select: one contiguous block copy per index
        keys = kb.index_select(0, kv_rows).view(R, width * bs, D)
        values = vb.index_select(0, kv_rows).view(R, width * bs, D)
        key_ok = (slot_used[..., None] & key_real[batch[rows, None], idx]).reshape(R, width * bs)
        penalty = torch.where(key_ok, 0.0, masked).to(acc)[:, None, :]  # [R, 1, W·bs]
        # Causal inside the diagonal block (slot 0); every other selected block lies wholly before the queries.
        causal_part = F.pad(diagonal_penalty, (0, (width - 1) * bs))  # [bs, W·bs]
        with_diagonal = key_ok[:, bs:].sum(-1, keepdim=True) + key_ok[:, :bs].cumsum(-1)  # keys visible [R, bs]
        without = key_ok.sum(-1, keepdim=True).expand(R, bs)
        if diagonal is None:  # mixed rows (traced graph)
            penalty = penalty + torch.where(has_diagonal[rows, None, None], causal_part, 0.0)
            visible = torch.where(has_diagonal[rows, None], with_diagonal, without)
        else:
            penalty = penalty + causal_part if diagonal else penalty
            visible = with_diagonal if diagonal else without
        out = F.scaled_dot_product_attention(qb.index_select(0, rows)[:, None], keys[:, None], values[:, None],
                                             attn_mask=penalty[:, None], scale=scale)[:, 0]
        outputs.append(torch.where((visible > 0)[..., None], out, torch.zeros((), dtype=out.dtype, device=device)))
        order.append(rows)
    order = torch.cat(order)
    out = torch.cat(outputs)[torch.argsort(order)]  # back to (batch, head, block) order
    out = out.view(B, H, n * bs, D)[:, :, :T].transpose(1, 2)
    return out.to(q.dtype)
