"""Differentiable torch.distributed collectives shared by the parallel paths (LASP-2 sequence parallelism, expert
parallelism). Every rank must take part in a collective's backward too: use each result in the loss."""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["all_gather_stacked", "all_reduce_sum"]


class _AllGatherStacked(torch.autograd.Function):
    """``x`` on every rank -> ``[world, *x.shape]``; backward sums every rank's gradient of this rank's slot."""

    @staticmethod
    def forward(ctx, x, group, rank):
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x, group=group)
        ctx.group, ctx.rank = group, rank
        return torch.stack(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad[ctx.rank], None, None


class _AllReduceSum(torch.autograd.Function):
    """The sum over ranks on every rank; backward: the sum over ranks of the gradients (each rank's loss reads the
    same sum)."""

    @staticmethod
    def forward(ctx, x, group):
        out = x.contiguous().clone()
        dist.all_reduce(out, group=group)
        ctx.group = group
        return out

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def all_gather_stacked(x: torch.Tensor, group, rank: int) -> torch.Tensor:
    return _AllGatherStacked.apply(x, group, rank)


def all_reduce_sum(x: torch.Tensor, group) -> torch.Tensor:
    return _AllReduceSum.apply(x, group)
