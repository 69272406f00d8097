"""Chunked recurrences run a group of chunks at a time (the CPU paths of GDN, GLA and KDA).

Every stage of a chunked path (decay masks, pairwise scores, the triangular solve, the output matmuls) makes a full
pass over tensors of ``[.., chunks, C, C]``. Over the whole sequence those tensors outgrow the CPU's cache and each
pass runs at memory speed; a group of chunks whose intermediates stay near ``GROUP_BYTES`` runs them at cache speed.
The state carried from group to group makes the result identical to one pass over all chunks.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

__all__ = ["GROUP_BYTES", "chunk_group_size", "scan_chunk_groups"]

GROUP_BYTES = 1 << 19


def chunk_group_size(num_chunks: int, bytes_per_chunk: int, device: torch.device) -> int:
    """How many chunks one group holds: all of them off CPU (GPU caches are not the bottleneck there)."""
    if device.type != "cpu":
        return num_chunks
    return max(1, min(num_chunks, GROUP_BYTES // max(1, bytes_per_chunk)))


def scan_chunk_groups(
    group_fn: Callable[..., tuple[torch.Tensor, torch.Tensor]],
    tensors: Sequence[torch.Tensor],
    state: torch.Tensor,
    *,
    dim: int,
    group: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``group_fn(*parts, state) -> (out, state)`` over consecutive groups of chunks along ``dim``; the outputs are
    concatenated along ``dim``. Inputs are split once (``torch.split``), so the backward gathers every group's
    gradient in one concatenation instead of one full-size buffer per group."""
    if group >= tensors[0].shape[dim]:
        return group_fn(*tensors, state)
    outs = []
    for parts in zip(*(t.split(group, dim=dim) for t in tensors)):
        out, state = group_fn(*parts, state)
        outs.append(out)
    return torch.cat(outs, dim=dim), state
