"""Block-sparse causal attention on CPU as unmasked flash-attention calls merged by their log-sum-exp.

A query block's selected keys fall in two parts: its own (diagonal) block, causal inside, and the earlier blocks it
selects, wholly visible. All diagonal blocks are one causal flash-attention call; the earlier blocks are gathered
per row, and rows selecting the same number of them share one call with no mask and no padding. The parts merge by
their log-sum-exp. The backward pass gathers again and runs torch's flash backward on each part against the
*merged* output and log-sum-exp (the probabilities of each part are then the merged softmax's, so each part's
gradient is exact), so no gathered copy lives between the passes.

Cost: the kept blocks' attention plus one copy of their keys and values; against :mod:`.chunk`'s masked groups it
saves the mask traffic (an additive ``[rows, block, width · block]`` mask per group) and the ladder's padding.
Handles ``attention_mask=None`` only (padding needs per-key masks: :mod:`.chunk` does that) and eager mode (the
groups are sized by the data).
"""

from __future__ import annotations

import threading

import torch

__all__ = ["split_flash_block_sparse"]

_FLASH = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_FLASH_BACKWARD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def _plan(selected: torch.Tensor, kv_row_base: torch.Tensor, n: int) -> list[tuple[bool, torch.Tensor, torch.Tensor]]:
    """The calls for ``selected [rows, N]`` (causal blocks only): ``(causal, query rows, key-block rows [R, W])``.

    First the rows whose diagonal block is selected (one causal call, W = 1), then one call per count of earlier
    blocks. ``kv_row_base[row] + block`` is the row of the key/value block tensor. ``None`` stands for "every row,
    in order" (query rows) and "the key blocks as they are" (key-block rows): nothing to gather.
    """
    rows_all = torch.arange(selected.shape[0], device=selected.device)
    block_of_row = rows_all % n
    calls = []
    diagonal = selected[rows_all, block_of_row]
    diag_rows = torch.nonzero(diagonal).flatten()
    if len(diag_rows) == len(rows_all):
        own_blocks = kv_row_base + block_of_row
        identity = torch.equal(own_blocks, torch.arange(len(own_blocks), device=own_blocks.device))
        calls.append((True, None, None if identity else own_blocks[:, None]))
    elif len(diag_rows):
        calls.append((True, diag_rows, (kv_row_base + block_of_row)[diag_rows, None]))
    earlier = selected.clone()
    earlier[rows_all, block_of_row] = False
    indices = torch.argsort((~earlier).to(torch.int8), dim=-1, stable=True)  # selected blocks first, ascending
    counts = earlier.sum(dim=-1)
    for count in torch.unique(counts).tolist():
        if count == 0:
            continue
        rows = torch.nonzero(counts == count).flatten()
        calls.append((False, rows, kv_row_base[rows, None] + indices[rows, :count]))
    return calls


class _Workspace(threading.local):
    """Reused gather buffers, one per thread: a fresh multi-megabyte tensor per call costs more in page faults than
    the copy itself. Safe because no gathered block outlives the flash call that reads it."""

    def __init__(self):
        self.buffers: dict[tuple, torch.Tensor] = {}

    def take(self, slot: int, numel: int, like: torch.Tensor) -> torch.Tensor:
        key = (slot, like.dtype, like.device)
        buffer = self.buffers.get(key)
        if buffer is None or buffer.numel() < numel:
            buffer = self.buffers[key] = torch.empty(numel, dtype=like.dtype, device=like.device)
        return buffer[:numel]


_WORKSPACE = _Workspace()


def _rows(x: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """``x[rows]`` with a head axis: ``[R, 1, ...]`` (``rows=None``: all of ``x``, no copy)."""
    return (x if rows is None else x.index_select(0, rows))[:, None]


def _gather(blocks: torch.Tensor, kv_rows: torch.Tensor | None, slot: int) -> torch.Tensor:
    """``blocks [M, bs, D]``, ``kv_rows [R, W]`` -> ``[R, 1, W · bs, D]`` (one head, the layout flash expects), in
    the workspace's buffer ``slot`` (valid until the next gather into that slot); ``kv_rows=None``: the blocks."""
    if kv_rows is None:
        return blocks[:, None]
    R, W = kv_rows.shape
    _, bs, D = blocks.shape
    out = _WORKSPACE.take(slot, R * W * bs * D, blocks).view(R * W, bs, D)
    torch.index_select(blocks, 0, kv_rows.flatten(), out=out)
    return out.view(R, 1, W * bs, D)


class _SplitFlash(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qb, kb, vb, calls, scale):
        rows_total, bs, D = qb.shape
        out = qb.new_zeros(rows_total, bs, D)
        lse = qb.new_full((rows_total, bs), float("-inf"))
        parts = []
        for causal, rows, kv_rows in calls:
            o, part_lse = _FLASH(_rows(qb, rows), _gather(kb, kv_rows, 0), _gather(vb, kv_rows, 1), 0.0, causal,
                                 scale=scale)
            parts.append((rows, o[:, 0], part_lse[:, 0]))
            if rows is None:
                lse = torch.logaddexp(lse, part_lse[:, 0])
            else:
                lse.index_copy_(0, rows, torch.logaddexp(lse.index_select(0, rows), part_lse[:, 0]))
        for rows, o, part_lse in parts:
            weighted = o * torch.exp(part_lse - _rows(lse, rows)[:, 0])[..., None]
            if rows is None:
                out += weighted
            else:
                out.index_add_(0, rows, weighted)
        ctx.save_for_backward(qb, kb, vb, out, lse)
        ctx.calls, ctx.scale = calls, scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        qb, kb, vb, out, lse = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        dq, dk, dv = torch.zeros_like(qb), torch.zeros_like(kb), torch.zeros_like(vb)
        for causal, rows, kv_rows in ctx.calls:
            part_dq, part_dk, part_dv = _FLASH_BACKWARD(
                _rows(grad_out, rows), _rows(qb, rows), _gather(kb, kv_rows, 0), _gather(vb, kv_rows, 1),
                _rows(out, rows), _rows(lse, rows), 0.0, causal, scale=ctx.scale)
            if rows is None:
                dq += part_dq[:, 0]
            else:
                dq.index_add_(0, rows, part_dq[:, 0])
            if kv_rows is None:
                dk += part_dk[:, 0]
                dv += part_dv[:, 0]
            else:
                flat = kv_rows.flatten()
                dk.index_add_(0, flat, part_dk.reshape(len(flat), *kb.shape[1:]))
                dv.index_add_(0, flat, part_dv.reshape(len(flat), *vb.shape[1:]))
        return dq, dk, dv, None, None


def split_flash_block_sparse(qb: torch.Tensor, kb: torch.Tensor, vb: torch.Tensor, selected: torch.Tensor,
                             kv_row_base: torch.Tensor, n: int, scale: float) -> torch.Tensor:
    """Blocks in, blocks out: ``qb [rows, bs, D]`` (rows = batch · head · block), ``kb``/``vb [kv rows, bs, D]``,
    ``selected [rows, N]`` bool (causal blocks only), ``kv_row_base [rows]``. Rows with no visible key give zeros.
    Float32 / bfloat16 / float16 blocks (torch's CPU flash kernel)."""
    calls = _plan(selected, kv_row_base, n)
    return _SplitFlash.apply(qb, kb, vb, calls, scale)
