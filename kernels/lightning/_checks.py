"""Input validation and packed-sequence plumbing of the Lightning ops (no side effects)."""

from __future__ import annotations

import torch

from ..varlen import parse_cu_seqlens, run_packed, shape_of

__all__ = ["check_lightning_inputs", "prepare_lightning_inputs", "run_lightning_sequences"]


def check_lightning_inputs(q, k, v, log_decay, initial_state, cu_seqlens) -> list[int]:
    """Validate; return the sequence lengths. q, k ``[B, T, H, K]``; v ``[B, T, H, V]``; log_decay ``[H]`` (<= 0, the
    log of each head's decay per step) or ``[B, T, H]`` (per token: 0 where a token must not decay the state, e.g.
    padding); initial_state ``[N, H, K, V]``. Errors name the tensor and its shape."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4 or not t.is_floating_point():
            raise ValueError(f"{name} must be a 4-D floating tensor [B, T, H, D], got "
                             f"{shape_of(t) if isinstance(t, torch.Tensor) else type(t).__name__}")
    if k.shape != q.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"k {shape_of(k)} must equal q {shape_of(q)}, and v {shape_of(v)} match it in [B, T, H]")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share a dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    B, T, H = q.shape[:3]
    if not isinstance(log_decay, torch.Tensor) or tuple(log_decay.shape) not in ((H,), (B, T, H)):
        raise ValueError(f"log_decay must be a tensor [H] = [{H}] (per head) or [B, T, H] = [{B}, {T}, {H}] (per "
                         f"token, e.g. 0 on padding), got "
                         f"{shape_of(log_decay) if isinstance(log_decay, torch.Tensor) else type(log_decay).__name__}")
    # A value check reads the tensor: skipped while compiling (a traced graph cannot branch on data).
    if not torch.compiler.is_compiling() and (not torch.isfinite(log_decay).all() or (log_decay > 0).any()):
        raise ValueError(f"log_decay must be finite and <= 0 (a decay in (0, 1] per step), got {log_decay.tolist()}")
    lengths = parse_cu_seqlens(cu_seqlens, q.shape[0], q.shape[1], shape_of(q))
    if initial_state is not None:
        expected = (len(lengths), H, q.shape[3], v.shape[3])
        if tuple(initial_state.shape) != expected:
            raise ValueError(f"initial_state shape {shape_of(initial_state)} must be [N, H, K, V] = {expected}")
    return lengths


def decay_as_gla_gate(log_decay: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """The per-head ``[H]`` or per-token ``[B, T, H]`` log decay as a GLA gate ``[B, T, H, K]`` (the same on every key
    channel), a broadcast view in ``log_decay``'s dtype."""
    B, T, H, K = q.shape
    per_token = log_decay.view(1, 1, H) if log_decay.dim() == 1 else log_decay
    return per_token[..., None].expand(B, T, H, K)


def prepare_lightning_inputs(q, k, v, log_decay, initial_state, scale):
    """fp32 (float64 stays) copies with q scaled; the decay as a per-token log gate ``g [B, T, H]``."""
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    g = log_decay.to(dtype)
    g = g.expand(q.shape[0], q.shape[1], -1) if g.dim() == 1 else g
    h0 = initial_state.to(dtype) if initial_state is not None else None
    return q.to(dtype) * scale, k.to(dtype), v.to(dtype), g, h0


def run_lightning_sequences(core, q, k, v, g, h0, lengths, packed: bool):
    """``core(q, k, v, g, h0) -> (o, S)`` on the batch, or per packed sequence of ``cu_seqlens`` (``packed``)."""
    n = q.shape[0]

    def empty(tensors, state):
        q, _, v, _ = tensors
        B, T, H, K = q.shape
        return q.new_zeros(B, T, H, v.shape[-1]), (state if state is not None else
                                                   q.new_zeros(n if not packed else 1, H, K, v.shape[-1]))

    return run_packed(core, (q, k, v, g), h0, lengths if packed else None, empty)
