"""Output-buffer allocation for the Triton ops.

Kernels must write every element they return. Setting ``HF_ARCH_POISON_BUFFERS=1`` (the kernel tests do) fills new
buffers with NaN instead of leaving them uninitialised, so a masked-out store or a missed tile shows up as NaN in
the comparison against the reference rather than as plausible stale memory.
"""

from __future__ import annotations

import os

import torch

__all__ = ["POISON_ENV_VAR", "new_buffer"]

POISON_ENV_VAR = "HF_ARCH_POISON_BUFFERS"


def new_buffer(*shape: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``torch.empty``, or a NaN-filled tensor when ``HF_ARCH_POISON_BUFFERS`` is set (read per call)."""
    if os.environ.get(POISON_ENV_VAR, "") not in ("", "0"):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)
