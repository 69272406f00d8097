"""Input validation and shared input preparation for the Kimi Delta Attention (KDA) ops.

KDA is the gated delta rule with a per-channel decay: g is ``[B, T, H, K]`` instead of ``[B, T, H]``. Everything
that does not depend on g's shape comes from the delta-rule / GLA helpers. Pure tensor code: no transformers import.
"""

from __future__ import annotations

import torch

from ..delta_rule._checks import l2norm
from ..gla._checks import compute_dtype
from ..varlen import parse_cu_seqlens, run_packed, shape_of

__all__ = ["check_kda_inputs", "prepare_kda_inputs", "run_kda_sequences"]


def check_kda_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None,
    initial_state: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    chunk_size: int | None = None,
) -> int:
    """Validate shapes/dtypes; raise ``ValueError`` naming the tensor. Returns the number of sequences N.

    Layout (fla): q, k, g ``[B, T, H, K]``; v ``[B, T, H, V]``; beta ``[B, T, H]``; initial_state ``[N, H, K, V]``;
    cu_seqlens ``[N + 1]`` (then B must be 1). No GVA: v has the heads of q and k.
    """
    for name, x in (("q", q), ("k", k), ("v", v), ("g", g), ("beta", beta)):
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if q.dim() != 4:
        raise ValueError(f"q must be 4-D [B, T, H, K], got shape {shape_of(q)}")
    if k.shape != q.shape:
        raise ValueError(f"k must have the shape of q {shape_of(q)}, got {shape_of(k)}")
    if v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v must be 4-D [B, T, H, V] with B, T, H of q {shape_of(q)}, got {shape_of(v)}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share a dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    if g.shape != q.shape:
        hint = ""
        if g.dim() == 3:
            hint = " (KDA's decay is per key channel; a [B, T, H] gate is the scalar gated delta rule)"
        raise ValueError(f"g must have shape [B, T, H, K] = {shape_of(q)}, got {shape_of(g)}{hint}")
    if shape_of(beta) != shape_of(q)[:3]:
        raise ValueError(f"beta must have shape [B, T, H] = {shape_of(q)[:3]}, got {shape_of(beta)}")
    for name, x in (("k", k), ("v", v), ("g", g), ("beta", beta)):
        if x.device != q.device:
            raise ValueError(f"{name} is on {x.device} but q is on {q.device}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
        raise ValueError(f"scale must be a number or None, got {type(scale).__name__}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")

    B, T, H, K = q.shape
    N = len(parse_cu_seqlens(cu_seqlens, B, T, shape_of(q)))
    if initial_state is not None:
        expected_h = (N, H, K, v.shape[3])
        if not isinstance(initial_state, torch.Tensor) or shape_of(initial_state) != expected_h:
            shape = shape_of(initial_state) if isinstance(initial_state, torch.Tensor) else type(initial_state).__name__
            raise ValueError(f"initial_state must have shape [N, H, K, V] = {expected_h}, got {shape}")
        if not initial_state.is_floating_point():
            raise ValueError(f"initial_state must be floating-point, got {initial_state.dtype}")
        if initial_state.device != q.device:
            raise ValueError(f"initial_state is on {initial_state.device} but q is on {q.device}")
    return N


def prepare_kda_inputs(q, k, v, g, beta, initial_state, scale, use_qk_l2norm):
    """Copies in the compute dtype (fp32, fp64 when any input is fp64), optional q/k L2 norm (after the cast, as fla),
    default scale ``K ** -0.5``; returns (q, k, v, g, beta, h0, scale)."""
    dt = compute_dtype(q, k, v, g, beta, initial_state)
    q, k, v, g, beta = (x.to(dt) for x in (q, k, v, g, beta))
    if use_qk_l2norm:
        q, k = l2norm(q), l2norm(k)
    h0 = None if initial_state is None else initial_state.to(dt)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    return q, k, v, g, beta, h0, float(scale)


def run_kda_sequences(core, q, k, v, g, beta, h0, cu_seqlens, **kwargs):
    """Apply ``core`` (``[B, T, H, *]`` inputs in the compute dtype -> (o ``[B, T, H, V]``, final state
    ``[B, H, K, V]``)) to the batch, or to each packed sequence when ``cu_seqlens`` is given."""
    lengths = None if cu_seqlens is None else parse_cu_seqlens(cu_seqlens, q.shape[0], q.shape[1], shape_of(q))
    H, K, V = q.shape[2], q.shape[3], v.shape[3]

    def empty(tensors, h):  # a length-0 sequence: no output, its state passes through
        v = tensors[2]
        return v.new_zeros(v.shape), (h if h is not None else v.new_zeros(v.shape[0], H, K, V))

    return run_packed(core, (q, k, v, g, beta), h0, lengths, empty, **kwargs)
