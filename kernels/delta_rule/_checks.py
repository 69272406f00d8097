"""Input validation and shared input preparation for the gated delta rule ops.

Pure tensor code: no transformers import.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..varlen import parse_cu_seqlens, shape_of, run_packed



def check_gated_delta_rule_inputs(
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

    Layout (fla): q, k ``[B, T, H, K]``; v ``[B, T, HV, V]`` with ``HV % H == 0`` (GVA); g, beta ``[B, T, HV]``;
    initial_state ``[N, HV, K, V]``; cu_seqlens ``[N + 1]`` (then B must be 1).
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
    if v.dim() != 4 or v.shape[:2] != q.shape[:2]:
        raise ValueError(f"v must be 4-D [B, T, HV, V] with B, T of q {shape_of(q)}, got {shape_of(v)}")
    H, HV = q.shape[2], v.shape[2]
    if HV == 0 or H == 0 or HV % H != 0:
        raise ValueError(f"v heads ({HV}, shape {shape_of(v)}) must be a positive multiple of q/k heads ({H}, shape {shape_of(q)})")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share a dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    expected = shape_of(v)[:3]
    if shape_of(g) != expected:
        raise ValueError(f"g must have shape [B, T, HV] = {expected}, got {shape_of(g)}")
    if shape_of(beta) != expected:
        raise ValueError(f"beta must have shape [B, T, HV] = {expected}, got {shape_of(beta)}")
    for name, x in (("k", k), ("v", v), ("g", g), ("beta", beta)):
        if x.device != q.device:
            raise ValueError(f"{name} is on {x.device} but q is on {q.device}")
    if scale is not None and not isinstance(scale, (int, float)):
        raise ValueError(f"scale must be a number or None, got {type(scale).__name__}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")

    B, T = q.shape[:2]
    N = len(parse_cu_seqlens(cu_seqlens, B, T, shape_of(q)))
    if initial_state is not None:
        expected_h = (N, HV, q.shape[3], v.shape[3])
        if not isinstance(initial_state, torch.Tensor) or shape_of(initial_state) != expected_h:
            shape = shape_of(initial_state) if isinstance(initial_state, torch.Tensor) else type(initial_state).__name__
            raise ValueError(f"initial_state must have shape [N, HV, K, V] = {expected_h}, got {shape}")
        if not initial_state.is_floating_point():
            raise ValueError(f"initial_state must be floating-point, got {initial_state.dtype}")
    return N


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``x / sqrt(sum(x**2) + eps)`` over the last dim (fla's convention: eps inside the sqrt)."""
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + eps)


def prepare_inputs(q, k, v, g, beta, scale, use_qk_l2norm):
    """fp32 copies, optional q/k L2 norm, q/k repeated to the v-head count (GVA); returns (q, k, v, g, beta, scale)."""
    q, k, v, g, beta = (x if x.dtype == torch.float32 else x.float() for x in (q, k, v, g, beta))
    if use_qk_l2norm:
        q, k = l2norm(q), l2norm(k)
    rep = v.shape[2] // q.shape[2]
    if rep != 1:
        q, k = q.repeat_interleave(rep, dim=2), k.repeat_interleave(rep, dim=2)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    return q, k, v, g, beta, float(scale)


Core = Callable[..., tuple[torch.Tensor, torch.Tensor]]


def run_sequences(core: Core, q, k, v, g, beta, initial_state, cu_seqlens, **kwargs):
    """Apply ``core`` (fp32 [B, T, H, *] inputs -> (o [B, T, HV, V] fp32, final state [B, HV, K, V] fp32)) per batch,
    or per packed sequence when ``cu_seqlens`` is given."""
    h0 = None if initial_state is None else initial_state.float()
    lengths = None if cu_seqlens is None else parse_cu_seqlens(cu_seqlens, q.shape[0], q.shape[1], shape_of(q))
    HV, K, V = v.shape[2], q.shape[3], v.shape[3]

    def empty(tensors, h):
        v = tensors[2]
        return v.new_zeros(v.shape), (h if h is not None else q.new_zeros(v.shape[0], HV, K, V))

    return run_packed(core, (q, k, v, g, beta), h0, lengths, empty, **kwargs)
