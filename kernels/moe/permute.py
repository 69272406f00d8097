"""Grouping assignments by expert: the permutation both the PyTorch and the Triton paths run on."""

from __future__ import annotations

import torch

__all__ = ["sort_by_expert"]


def sort_by_expert(expert_idx: torch.LongTensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(order, counts, offsets)`` for ``expert_idx`` ``[A]`` with values in ``[0, num_experts)``.

    ``order`` ``[A]``: a stable argsort, so ``expert_idx[order]`` is non-decreasing and assignments of one expert keep
    their original order (deterministic results for duplicate tokens). ``counts`` ``[E]``: assignments per expert.
    ``offsets`` ``[E + 1]``: cumulative counts starting at 0; expert ``e`` owns sorted rows
    ``offsets[e]:offsets[e + 1]``. All int64, on expert_idx's device.
    """
    expert_idx = expert_idx.reshape(-1).long()
    order = torch.argsort(expert_idx, stable=True)
    counts = torch.bincount(expert_idx, minlength=num_experts)
    if counts.numel() > num_experts:
        raise ValueError(f"expert_idx holds ids >= num_experts ({num_experts})")
    offsets = torch.zeros(num_experts + 1, dtype=torch.long, device=expert_idx.device)
    torch.cumsum(counts, 0, out=offsets[1:])
    return order, counts, offsets
