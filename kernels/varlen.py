"""Packed variable-length sequences (``cu_seqlens``), shared by every op: validation and per-sequence dispatch.

Convention (fla / flash-attn): ``B == 1`` and ``cu_seqlens = [0, l_1, l_1 + l_2, ..., T]`` cut the time axis into
N independent sequences; each starts from its own initial state (or zeros).
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

__all__ = ["parse_cu_seqlens", "run_packed", "shape_of"]


def shape_of(x: torch.Tensor) -> tuple[int, ...]:
    """``tuple(x.shape)``, for error messages."""
    return tuple(x.shape)


def parse_cu_seqlens(cu_seqlens: Optional[torch.Tensor], batch: int, total: int, shape: tuple) -> list[int]:
    """Sequence lengths: ``[T] * B`` without ``cu_seqlens``; raise ``ValueError`` naming the problem otherwise.

    ``shape`` is the shape of the tensor the lengths refer to (for the messages).
    """
    if cu_seqlens is None:
        return [total] * batch
    if (
        not isinstance(cu_seqlens, torch.Tensor)
        or cu_seqlens.dim() != 1
        or cu_seqlens.is_floating_point()
        or cu_seqlens.is_complex()
        or cu_seqlens.dtype == torch.bool
    ):
        got = (tuple(cu_seqlens.shape), cu_seqlens.dtype) if isinstance(cu_seqlens, torch.Tensor) else type(cu_seqlens).__name__
        raise ValueError(f"cu_seqlens must be a 1-D integer tensor [N + 1], got {got}")
    if batch != 1:
        raise ValueError(f"with cu_seqlens the batch size must be 1 (packed sequences), got shape {shape}")
    bounds = cu_seqlens.tolist()
    if len(bounds) < 2:
        raise ValueError(f"cu_seqlens must hold at least 2 entries [0, ..., T], got {bounds}")
    if bounds[0] != 0 or bounds[-1] != total:
        raise ValueError(f"cu_seqlens must start at 0 and end at T={total} (shape {shape}), got {bounds[0]} ... {bounds[-1]}")
    lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    if any(n < 0 for n in lengths):
        raise ValueError(f"cu_seqlens must be non-decreasing, got {bounds}")
    return lengths


def run_packed(
    core: Callable[..., tuple[torch.Tensor, torch.Tensor]],
    tensors: Sequence[torch.Tensor],
    initial_state: Optional[torch.Tensor],
    lengths: Optional[list[int]],
    empty: Callable[[torch.Tensor, Optional[torch.Tensor]], tuple[torch.Tensor, torch.Tensor]],
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply ``core(*tensors, h0, **kwargs) -> (o, final_state)`` to the batch, or to each packed sequence.

    ``tensors`` are ``[B, T, ...]``; ``lengths`` None means "not packed". ``empty(time_slice, h0)`` gives the result
    for a length-0 sequence (its state passes through unchanged). Sequences are cut with one ``split`` per tensor:
    slicing the whole tensor per sequence would make the backward O(N * T).
    """
    if lengths is None:
        if tensors[0].shape[1] == 0:
            return empty(tensors, initial_state)
        return core(*tensors, initial_state, **kwargs)
    pieces = list(zip(*(x.split(lengths, dim=1) for x in tensors)))
    h0s = [None] * len(lengths) if initial_state is None else [h[None] for h in initial_state.unbind(0)]
    outs, finals = [], []
    for piece, h0 in zip(pieces, h0s):
        o, state = empty(piece, h0) if piece[0].shape[1] == 0 else core(*piece, h0, **kwargs)
        outs.append(o)
        finals.append(state)
    return torch.cat(outs, dim=1), torch.cat(finals, dim=0)
