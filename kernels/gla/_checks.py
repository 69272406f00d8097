"""Input validation and packed-sequence plumbing shared by the GLA ops (no side effects)."""

from __future__ import annotations

from typing import Optional

import torch

__all__ = ["check_gla_inputs", "compute_dtype", "run_per_sequence"]


def _shape(t: torch.Tensor) -> tuple:
    return tuple(t.shape)


def compute_dtype(*tensors: Optional[torch.Tensor]) -> torch.dtype:
    """fp32, or float64 when any input is float64 (useful for high-precision references in tests)."""
    for t in tensors:
        if t is not None and t.dtype == torch.float64:
            return torch.float64
    return torch.float32


def check_gla_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    initial_state: Optional[torch.Tensor] = None,
    cu_seqlens: Optional[torch.Tensor] = None,
) -> list[int]:
    """Validate GLA inputs; return the sequence lengths (``[T] * B`` without ``cu_seqlens``).

    Raises ``ValueError`` naming the offending tensor and its shape.
    Conventions: q, k, g ``[B, T, H, D_k]``; v ``[B, T, H, D_v]``; initial_state ``[N, H, D_k, D_v]``.
    q, k and v share one floating dtype; g has that dtype or float32/float64 (fp32 gates are recommended).
    """
    for name, t in (("q", q), ("k", k), ("v", v), ("g", g)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D [B, T, H, D], got shape {_shape(t)}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    if k.shape != q.shape:
        raise ValueError(f"k shape {_shape(k)} must equal q shape {_shape(q)} ([B, T, H, D_k])")
    if g.shape != q.shape:
        raise ValueError(f"g shape {_shape(g)} must equal q shape {_shape(q)} ([B, T, H, D_k])")
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v shape {_shape(v)} must match q shape {_shape(q)} in [B, T, H]")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share a dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    if g.dtype not in (q.dtype, torch.float32, torch.float64):
        raise ValueError(f"g dtype {g.dtype} must be q's dtype ({q.dtype}) or float32/float64")

    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    if cu_seqlens is not None:
        if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.is_floating_point():
            raise ValueError(f"cu_seqlens must be a 1-D integer tensor [N+1], got {cu_seqlens!r:.80}")
        if B != 1:
            raise ValueError(f"with cu_seqlens the batch must be 1 (packed sequences), got q shape {_shape(q)}")
        cu = cu_seqlens.tolist()
        if len(cu) < 2:
            raise ValueError(f"cu_seqlens must hold at least 2 values [0, ..., T], got {cu}")
        if cu[0] != 0:
            raise ValueError(f"cu_seqlens must start at 0, got {cu[:4]}...")
        if cu[-1] != T:
            raise ValueError(f"cu_seqlens must end at T={T} (q shape {_shape(q)}), got last value {cu[-1]}")
        if any(b < a for a, b in zip(cu[:-1], cu[1:])):
            raise ValueError(f"cu_seqlens must be non-decreasing, got {cu}")
        lengths = [b - a for a, b in zip(cu[:-1], cu[1:])]
    else:
        lengths = [T] * B
    N = len(lengths)
    if initial_state is not None:
        if not isinstance(initial_state, torch.Tensor):
            raise ValueError(f"initial_state must be a torch.Tensor, got {type(initial_state).__name__}")
        if tuple(initial_state.shape) != (N, H, Dk, Dv):
            raise ValueError(
                f"initial_state shape {_shape(initial_state)} must be [N, H, D_k, D_v] = {(N, H, Dk, Dv)} "
                f"(N = {'number of sequences in cu_seqlens' if cu_seqlens is not None else 'batch size'})"
            )
        if not initial_state.is_floating_point():
            raise ValueError(f"initial_state must be floating point, got dtype {initial_state.dtype}")
        if initial_state.device != q.device:
            raise ValueError(f"initial_state is on {initial_state.device} but q is on {q.device}")
    return lengths


def run_per_sequence(core, q, k, v, g, initial_state, cu_seqlens, lengths):
    """Apply ``core(q, k, v, g, h0) -> (o, S)`` to the whole batch, or to each packed sequence of ``cu_seqlens``.

    Inputs are ``[B, T, H, D]`` in the compute dtype; ``h0`` is ``[B, H, D_k, D_v]`` or None. Packed sequences are
    cut with one ``split`` (not per-sequence slicing of the whole tensor, which would make the backward O(N*T)).
    """
    if cu_seqlens is None:
        if q.shape[1] == 0:
            return _empty(q, v, initial_state, q.shape[0])
        return core(q, k, v, g, initial_state)
    outs, finals = [], []
    pieces = zip(*(x.split(lengths, dim=1) for x in (q, k, v, g)))
    h0s = initial_state.unbind(0) if initial_state is not None else [None] * len(lengths)
    for (qi, ki, vi, gi), h0 in zip(pieces, h0s):
        h0 = h0[None] if h0 is not None else None
        o, S = _empty(qi, vi, h0, 1) if qi.shape[1] == 0 else core(qi, ki, vi, gi, h0)
        outs.append(o)
        finals.append(S)
    return torch.cat(outs, 1), torch.cat(finals, 0)


def _empty(q, v, h0, n):
    B, T, H, Dk = q.shape
    o = q.new_zeros(B, T, H, v.shape[-1])
    S = h0 if h0 is not None else q.new_zeros(n, H, Dk, v.shape[-1])
    return o, S
