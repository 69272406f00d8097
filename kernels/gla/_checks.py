"""Input validation and packed-sequence plumbing shared by the GLA ops (no side effects)."""

from __future__ import annotations

from typing import Optional

import torch

from ..varlen import parse_cu_seqlens, shape_of, run_packed

__all__ = ["check_gla_inputs", "compute_dtype", "run_per_sequence"]



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
            raise ValueError(f"{name} must be 4-D [B, T, H, D], got shape {shape_of(t)}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    if k.shape != q.shape:
        raise ValueError(f"k shape {shape_of(k)} must equal q shape {shape_of(q)} ([B, T, H, D_k])")
    if g.shape != q.shape:
        raise ValueError(f"g shape {shape_of(g)} must equal q shape {shape_of(q)} ([B, T, H, D_k])")
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v shape {shape_of(v)} must match q shape {shape_of(q)} in [B, T, H]")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share a dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    if g.dtype not in (q.dtype, torch.float32, torch.float64):
        raise ValueError(f"g dtype {g.dtype} must be q's dtype ({q.dtype}) or float32/float64")

    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    lengths = parse_cu_seqlens(cu_seqlens, B, T, shape_of(q))
    N = len(lengths)
    if initial_state is not None:
        if not isinstance(initial_state, torch.Tensor):
            raise ValueError(f"initial_state must be a torch.Tensor, got {type(initial_state).__name__}")
        if tuple(initial_state.shape) != (N, H, Dk, Dv):
            raise ValueError(
                f"initial_state shape {shape_of(initial_state)} must be [N, H, D_k, D_v] = {(N, H, Dk, Dv)} "
                f"(N = {'number of sequences in cu_seqlens' if cu_seqlens is not None else 'batch size'})"
            )
        if not initial_state.is_floating_point():
            raise ValueError(f"initial_state must be floating point, got dtype {initial_state.dtype}")
        if initial_state.device != q.device:
            raise ValueError(f"initial_state is on {initial_state.device} but q is on {q.device}")
    return lengths


def run_per_sequence(core, q, k, v, g, initial_state, cu_seqlens, lengths):
    """Apply ``core(q, k, v, g, h0) -> (o, S)`` to the whole batch, or to each packed sequence of ``cu_seqlens``.

    Inputs are ``[B, T, H, D]`` in the compute dtype; ``h0`` is ``[B, H, D_k, D_v]`` or None.
    """
    n = q.shape[0]

    def empty(tensors, h0):
        q, _, v, _ = tensors
        B, T, H, Dk = q.shape
        o = q.new_zeros(B, T, H, v.shape[-1])
        return o, h0 if h0 is not None else q.new_zeros(n if cu_seqlens is None else 1, H, Dk, v.shape[-1])

    return run_packed(core, (q, k, v, g), initial_state, lengths if cu_seqlens is not None else None, empty)
