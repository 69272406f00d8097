"""LASP-2 sequence parallelism (Sun et al., "LASP-2: Rethinking Sequence Parallelism for Linear Attention and Its
Hybrid", arXiv 2502.07563) for the recurrent ops: a sequence split into contiguous chunks across the ranks of a
process group, each rank holding one chunk.

Every op here keeps a state ``S [N, H, K, V]`` that its chunk changes *affinely*: ``S_end = P · S_start + M`` with
``P [K, K]`` and ``M [K, V]`` depending only on the chunk's own keys, values and gates (GLA and Lightning: ``P`` is a
diagonal decay; the delta rules: a product of ``α (I − β k kᵀ)`` factors). Each rank computes its chunk's ``(P, M)``,
one all-gather exchanges them (size independent of the sequence length), and every rank folds the earlier ranks'
pairs into the state its chunk starts from, then runs its chunk from that state. Outputs, final states and every
gradient equal the single-process run.

- Diagonal decays (``gla``, ``lightning_attention``): ``M`` is the chunk's final state from a zero start and ``P`` its
  summed log decay, so one pass of the op gives ``M`` and the local output; the earlier chunks then add
  ``scale · (q_t ⊙ exp(cumsum g)_t) · S_start`` to each output (LASP-2's inter-chunk term). One pass.
- Delta rules (``gated_delta_rule``, ``kda``): the state's change is not diagonal, so ``(M, P)`` come from one pass
  with ``K`` extra value columns started at ``[0 | I]`` (each value column evolves alone under the same ``K × K``
  map: the identity's columns come out as ``P``), then the chunk runs again from its start state. Two passes.

The exchange is a custom autograd function on the group: forward all-gathers ``(P, M)`` and folds the prefix;
backward all-reduces the gradients of every rank's pair and keeps this rank's. Every rank calls it (its output feeds
each rank's second pass or correction), so the collective is reached in the same order everywhere. Use a group of
its own beside data parallelism (DDP runs its own all-reduces on the default group).

Activate with :func:`sequence_parallel` around the forward (and nothing else changes: :mod:`.ops` routes these four
ops here while a plan is active). Padding masks, packed sequences (``cu_seqlens``) and caches are refused by name.
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.distributed as dist

from .collectives import all_gather_stacked

__all__ = ["SequenceParallelPlan", "sequence_parallel", "active_plan", "all_gather_with_grad", "lasp2_diagonal",
           "lasp2_affine", "previous_rank_tail", "chunk_bounds"]


@dataclass(frozen=True)
class SequenceParallelPlan:
    """Where this process sits: ``rank`` of ``world_size`` in ``group`` (None: the default group); its chunk of a
    sequence of ``total_length`` tokens starts at ``offset``."""

    group: Optional[object]
    rank: int
    world_size: int
    offset: int = 0
    total_length: Optional[int] = None


_PLAN: contextvars.ContextVar[Optional[SequenceParallelPlan]] = contextvars.ContextVar("hf_arch_sp_plan", default=None)


def active_plan() -> Optional[SequenceParallelPlan]:
    """The plan of the enclosing :func:`sequence_parallel` block, or None (always None in a traced graph: dynamo
    cannot read a ContextVar, and a compiled forward is not split across ranks)."""
    if torch.compiler.is_compiling():
        return None
    return _PLAN.get()


def chunk_bounds(total_length: int, world_size: int) -> list[tuple[int, int]]:
    """Contiguous ``(start, end)`` per rank; ``total_length`` must divide evenly (pad the batch first)."""
    if world_size < 1:
        raise ValueError(f"sequence parallelism: world size must be >= 1, got {world_size}")
    if total_length < world_size:
        raise ValueError(f"sequence parallelism: {total_length} tokens cannot be split across {world_size} ranks "
                         "(a world size larger than the number of chunks)")
    if total_length % world_size:
        raise ValueError(f"sequence parallelism: sequence length {total_length} is not divisible by the world size "
                         f"{world_size}; pad it to a multiple of {world_size} (the sequence-parallel split_batch pads)")
    size = total_length // world_size
    return [(r * size, (r + 1) * size) for r in range(world_size)]


@contextlib.contextmanager
def sequence_parallel(group=None, total_length: Optional[int] = None):
    """Run the enclosed forward (and the backward of what it builds) sequence-parallel over ``group``.

    Each rank passes its own contiguous chunk (``chunk_bounds``); positions are the caller's (pass ``position_ids``
    of the chunk's global positions). ``total_length``: the whole sequence's length (for the offset)."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("sequence_parallel: torch.distributed is not initialised (init_process_group first)")
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    offset = chunk_bounds(total_length, world)[rank][0] if total_length is not None else 0
    token = _PLAN.set(SequenceParallelPlan(group, rank, world, offset, total_length))
    try:
        yield _PLAN.get()
    finally:
        _PLAN.reset(token)


def refuse_unsupported(op: str, cu_seqlens=None, attention_mask=None) -> None:
    if cu_seqlens is not None:
        raise ValueError(f"{op} under sequence parallelism: packed sequences (cu_seqlens) are not supported; "
                         "split unpacked rows")
    if attention_mask is not None and not bool(attention_mask.all()):
        raise ValueError(f"{op} under sequence parallelism: padding masks are not supported; pad sequences to one "
                         "length with real tokens or split them without padding")


def all_gather_with_grad(x: torch.Tensor, plan: SequenceParallelPlan) -> torch.Tensor:
    """Differentiable all-gather along a new leading axis. Every rank must use the result in its loss (or gather
    nothing): the backward is a collective."""
    return all_gather_stacked(x, plan.group, plan.rank)


def previous_rank_tail(x: torch.Tensor, width: int, plan: SequenceParallelPlan) -> torch.Tensor:
    """The last ``width`` positions of the previous rank's ``x [B, T, ...]`` (zeros on rank 0): the halo a short
    convolution needs across a chunk boundary. Differentiable."""
    if x.shape[1] < width:
        raise ValueError(f"sequence parallelism: each rank's chunk ({x.shape[1]} tokens) must be at least the "
                         f"convolution's {width} tokens of history")
    tails = all_gather_with_grad(x[:, x.shape[1] - width:], plan)  # [W, B, width, ...]
    if plan.rank == 0:
        return tails[0] * 0  # stays on the graph: every rank's backward reaches the collective
    return tails[plan.rank - 1]


class _FoldPrefix(torch.autograd.Function):
    """``(P, M)`` of this rank's chunk -> (state entering this chunk, state after the last chunk), from an
    all-gather of every rank's pair; ``initial`` the state before rank 0. Backward recomputes the fold with autograd
    and all-reduces the gradients of all pairs (each rank's pair feeds the later ranks' states)."""

    @staticmethod
    def forward(ctx, P, M, initial, group, rank, diagonal):
        pairs = []
        for x in (P, M):
            parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
            dist.all_gather(parts, x.contiguous(), group=group)
            pairs.append(torch.stack(parts))
        ctx.save_for_backward(pairs[0], pairs[1], initial)
        ctx.group, ctx.rank, ctx.diagonal = group, rank, diagonal
        start, final = _fold(pairs[0], pairs[1], initial, rank, diagonal)
        return start.clone(), final.clone()  # never an input returned as itself

    @staticmethod
    def backward(ctx, grad_start, grad_final):
        Ps, Ms, initial = ctx.saved_tensors
        with torch.enable_grad():
            Ps, Ms = Ps.detach().requires_grad_(), Ms.detach().requires_grad_()
            initial = initial.detach().requires_grad_(initial.requires_grad)
            start, final = _fold(Ps, Ms, initial, ctx.rank, ctx.diagonal)
            outputs, grads = [], []
            for out, g in ((start, grad_start), (final, grad_final)):
                if g is not None and out.requires_grad:  # rank 0's start is the initial state itself
                    outputs.append(out)
                    grads.append(g)
            inputs = (Ps, Ms) + ((initial,) if initial.requires_grad else ())
            found = torch.autograd.grad(outputs, inputs, grads, allow_unused=True) if outputs else (None,) * len(inputs)
        gP, gM = (torch.zeros_like(x) if g is None else g for x, g in zip((Ps, Ms), found[:2]))
        both = torch.cat([gP.flatten(), gM.flatten()])
        dist.all_reduce(both, group=ctx.group)  # every rank's contribution to every pair's gradient
        gP, gM = both[: gP.numel()].view_as(gP), both[gP.numel():].view_as(gM)
        g_initial = None
        if initial.requires_grad:
            g_initial = found[2] if found[2] is not None else torch.zeros_like(initial)
        return gP[ctx.rank], gM[ctx.rank], g_initial, None, None, None


def _step(P: torch.Tensor, M: torch.Tensor, state: torch.Tensor, diagonal: bool) -> torch.Tensor:
    if diagonal:  # P: per-key-channel decay [N, H, K]
        return P[..., None] * state + M
    return P @ state + M


def _fold(Ps, Ms, initial, rank: int, diagonal: bool):
    state = initial
    start = None
    for j in range(Ps.shape[0]):
        if j == rank:
            start = state
        state = _step(Ps[j], Ms[j], state, diagonal)
    return start, state


def _fold_prefix(P, M, initial, plan: SequenceParallelPlan, diagonal: bool):
    return _FoldPrefix.apply(P, M, initial, plan.group, plan.rank, diagonal)


def _wide(dtype: torch.dtype) -> torch.dtype:
    """States and folds in fp32 at least (fp64 stays fp64)."""
    return torch.promote_types(dtype, torch.float32)


def _initial(initial_state, like_state_shape, device, dtype) -> torch.Tensor:
    if initial_state is not None:
        return initial_state.to(_wide(initial_state.dtype))
    return torch.zeros(like_state_shape, dtype=_wide(dtype), device=device)


def lasp2_diagonal(op: Callable, q, k, v, log_decay_per_token: torch.Tensor, *, scale: float, plan: SequenceParallelPlan,
                   initial_state=None, output_final_state: bool = False, **op_kwargs):
    """LASP-2 for an op with a diagonal per-token decay: ``op(q, k, v, ..., initial_state=None,
    output_final_state=True)`` gives the local output and ``M``; ``log_decay_per_token [B, T, H, K]`` (the decay's
    log per token, per key channel, fp32) gives ``P`` and the inter-chunk term. ``scale`` must be the op's own."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    wide = _wide(q.dtype)
    o_local, M = op(q, k, v, initial_state=None, output_final_state=True, **op_kwargs)
    cum = log_decay_per_token.to(wide).cumsum(1)  # [B, T, H, K]
    P = cum[:, -1].exp()  # [B, H, K]
    start, final = _fold_prefix(P, M.to(wide), _initial(initial_state, (B, H, K, V), q.device, wide), plan,
                                diagonal=True)
    inter = torch.einsum("bthk,bhkv->bthv", q.to(wide) * cum.exp(), start) * scale
    o = (o_local.to(wide) + inter).to(o_local.dtype)
    return o, (final if output_final_state else None)


def lasp2_affine(op: Callable, q, k, v, *, plan: SequenceParallelPlan, initial_state=None,
                 output_final_state: bool = False, state_heads: Optional[int] = None, **op_kwargs):
    """LASP-2 for an op whose state changes by a general ``K × K`` map per token (the delta rules): pass 1 with
    ``K`` extra zero value columns from ``[0 | I]`` gives ``(M, P)``; pass 2 runs the chunk from its start state.
    ``state_heads``: the state's head count (the value heads under grouped values)."""
    B, T, H, K = k.shape
    HV, V = v.shape[2], v.shape[-1]
    heads = state_heads or HV
    wide = _wide(k.dtype)
    eye = torch.eye(K, dtype=wide, device=k.device).expand(B, heads, K, K)
    zero_state = torch.zeros(B, heads, K, V, dtype=wide, device=k.device)
    v_aug = torch.cat([v, v.new_zeros(B, T, HV, K)], dim=-1)
    _, transition = op(q, k, v_aug, initial_state=torch.cat([zero_state, eye], dim=-1), output_final_state=True,
                       **op_kwargs)
    M, P = transition[..., :V].to(wide), transition[..., V:].to(wide)
    start, final = _fold_prefix(P, M, _initial(initial_state, (B, heads, K, V), k.device, wide), plan,
                                diagonal=False)
    o, _ = op(q, k, v, initial_state=start, output_final_state=False, **op_kwargs)
    return o, (final if output_final_state else None)
