"""Input checks and key masks shared by the softmax attention ops (sliding window, block sparse, SA-Softmax).

Pure torch, no side effects: the exported remote code flattens this module into ``modeling_hf_arch.py``, so it must
not import transformers nor any Triton module. Every check raises ``ValueError`` naming the offending argument.
"""

from __future__ import annotations

import torch

from .varlen import shape_of

__all__ = ["causal_key_mask", "check_attention_mask", "check_qkv", "resolve_scale"]


def _check_is_float_4d(name: str, x: torch.Tensor) -> None:
    """One q / k / v argument is a 4-D floating tensor (checked before any shape is read)."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{name} must be 4-D [B, T, heads, D], got shape {shape_of(x)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating tensor, got dtype {x.dtype}")


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None) -> None:
    """q ``[B, T, H, D]`` and k/v ``[B, T, H_kv, D]`` with ``H % H_kv == 0``, one dtype and one device.

    ``v=None`` checks q and k only (the pooled-score ops take no values). Every softmax attention op shares this
    contract, so they share the check and its messages.
    """
    named = (("q", q), ("k", k)) + ((("v", v),) if v is not None else ())
    for name, x in named:
        _check_is_float_4d(name, x)
    B, T, H, D = q.shape
    if v is not None and shape_of(k) != shape_of(v):
        raise ValueError(f"k and v must have the same shape, got k {shape_of(k)} and v {shape_of(v)}")
    if k.shape[0] != B or k.shape[1] != T or k.shape[3] != D:
        raise ValueError(
            f"k/v must be [B, T, H_kv, D] matching q [B, T, H, D] = {shape_of(q)} in B, T and D, got k {shape_of(k)}"
        )
    if any(x.dtype != q.dtype for _, x in named):
        got = ", ".join(f"{name} {x.dtype}" for name, x in named)
        raise ValueError(f"q, k, v must share a dtype, got {got}")
    if any(x.device != q.device for _, x in named):
        got = ", ".join(f"{name} {x.device}" for name, x in named)
        raise ValueError(f"q, k, v must be on one device, got {got}")
    H_kv = k.shape[2]
    if H_kv < 1 or H % H_kv != 0:
        raise ValueError(f"q heads H={H} must be divisible by k/v heads H_kv={H_kv} (q {shape_of(q)}, k {shape_of(k)})")


def check_attention_mask(
    attention_mask: torch.Tensor | None, B: int, T: int, device: torch.device | None = None
) -> None:
    """``attention_mask`` is None or a ``[B, T]`` tensor; on ``device`` too when one is given.

    ``device=None`` skips the device check, for ops that move the mask themselves (sliding window).
    """
    if attention_mask is None:
        return
    if not isinstance(attention_mask, torch.Tensor) or shape_of(attention_mask) != (B, T):
        got = shape_of(attention_mask) if isinstance(attention_mask, torch.Tensor) else type(attention_mask).__name__
        raise ValueError(f"attention_mask must have shape [B, T] = {(B, T)}, got {got}")
    if device is not None and attention_mask.device != device:
        raise ValueError(f"attention_mask must be on q's device {device}, got {attention_mask.device}")


def resolve_scale(scale: float | None, D: int) -> float:
    """The softmax scale: ``D ** -0.5`` by default, else ``float(scale)`` (one rule for every backend)."""
    if scale is None:
        return D**-0.5
    return float(scale)


def causal_key_mask(T: int, attention_mask: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """``[B or 1, 1, T, T]`` bool: key s visible to query t (s <= t, key not padding)."""
    t = torch.arange(T, device=device)
    allowed = (t[None, :] <= t[:, None])[None, None]
    if attention_mask is not None:
        allowed = allowed & (attention_mask != 0)[:, None, None, :]
    return allowed


def trailing_causal_key_mask(T_q: int, attention_mask: torch.Tensor | None, S: int,
                             device: torch.device) -> torch.Tensor:
    """``[B or 1, 1, T_q, S]`` bool for queries that are the last ``T_q`` of ``S`` positions (decode over a cache):
    key s visible to query t when s <= S - T_q + t and the key is not padding (attention_mask ``[B, S]``)."""
    t = torch.arange(T_q, device=device)[:, None] + (S - T_q)
    allowed = (torch.arange(S, device=device)[None, :] <= t)[None, None]
    if attention_mask is not None:
        allowed = allowed & (attention_mask != 0)[:, None, None, :]
    return allowed
