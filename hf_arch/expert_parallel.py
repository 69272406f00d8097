"""Expert parallelism for hf-arch MoE models: each process keeps ``E / W`` of every layer's experts, tokens stay
with the process that holds them (data parallel), and the dispatch runs on ``torch.distributed`` collectives.

    dist.init_process_group("gloo" or "nccl")
    plan = shard_experts(model)            # every expert table now holds this rank's E / W experts
    loss = model(**this_ranks_batch).loss
    loss.backward()
    plan.reduce_gradients()                 # = data-parallel training of the unsharded model on the ranks' batches

Under ``Trainer`` + ``accelerate launch`` (DDP): ``shard_experts(model, data_parallel_wrapper=True)`` before building
the ``Trainer``, nothing else.

Per sparse layer: one differentiable all-gather brings every rank's tokens and routing (assignments and weights) to
every rank; each rank runs its own experts on the assignments that reach them (the grouped expert op, unchanged);
one differentiable all-reduce sums the contributions, and each rank keeps its tokens' rows. Routing, shared and
zero-computation experts, auxiliary losses and statistics stay per rank, as in the unsharded model on that rank's
batch. Gradients: the all-reduce's backward brings every rank's loss to every expert, so an expert's gradient is the
sum over ranks' losses and ``reduce_gradients`` divides it by ``W``; every replicated parameter's gradient is
averaged over the ranks (what DDP does), which together equal the unsharded model trained on the mean of the ranks'
losses. Checkpoints: ``gather_experts`` puts the full tables back (every rank) before ``save_pretrained``.

Models transformers can run natively (``hf-arch export --native``: Mixtral, Qwen2-MoE, Qwen3-MoE) also shard with
transformers' own plan, ``from_pretrained(..., distributed_config=DistributedConfig(tp_plan="auto",
enable_expert_parallel=True))``; this module is for the rest (our routers, pools, zero-computation experts).

A number of experts that ``W`` does not divide, a model without expert tables and a process group that is not
initialised are refused by name. (The collectives move ``W ×`` the tokens' hidden states per layer, the simple
scheme gloo supports; an all-to-all dispatch is the NCCL-scale refinement.)
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from .kernels.collectives import all_gather_stacked, all_reduce_sum
from .kernels.ops import weighted_expert_mlp

__all__ = ["ExpertParallelPlan", "ExpertShard", "expert_parallel_mlp", "gather_experts", "shard_experts"]


@dataclass(frozen=True)
class ExpertShard:
    group: object
    rank: int
    world: int
    first: int  # this rank's first expert (global id)
    count: int  # experts this rank holds
    total: int  # experts in the unsharded table


@dataclass
class ExpertParallelPlan:
    model: torch.nn.Module
    group: object
    world: int
    expert_parameters: list[str] = field(default_factory=list)
    wrapped: bool = False  # a DDP wrapper averages the replicated gradients; hooks scale the experts'

    def reduce_gradients(self) -> None:
        """For a training loop without a DDP wrapper: expert gradients ÷ W, replicated gradients averaged over the
        ranks."""
        if self.wrapped:
            raise RuntimeError("shard_experts(..., data_parallel_wrapper=True): the DDP wrapper and the gradient "
                               "hooks already reduce the gradients; reduce_gradients would do it twice")
        experts = set(self.expert_parameters)
        for name, p in self.model.named_parameters():
            if p.grad is None:
                continue
            if name in experts:
                p.grad.div_(self.world)
            else:
                dist.all_reduce(p.grad, group=self.group)
                p.grad.div_(self.world)


def _expert_tables(model) -> list[tuple[str, torch.nn.Module]]:
    from .layers.moe_experts import HfArchExperts

    return [(name, m) for name, m in model.named_modules() if isinstance(m, HfArchExperts)]


def shard_experts(model, group=None, data_parallel_wrapper: bool = False) -> ExpertParallelPlan:
    """Keep this rank's slice of every expert table of ``model`` (in place) and route its experts' work through the
    collectives of ``group`` (default: the whole world).

    ``data_parallel_wrapper=True`` when DDP will wrap the model (``Trainer`` under ``accelerate launch`` / torchrun):
    DDP is told to leave the expert tables alone (each rank's differ) and their gradients are divided by ``W`` as
    they arrive, while DDP averages the replicated ones; call it before the ``Trainer`` is built, and train with
    ``max_grad_norm=0`` (each rank would clip by the norm of its own experts only)."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("expert parallelism needs an initialised torch.distributed process group "
                           "(dist.init_process_group, or a launcher such as torchrun / accelerate launch)")
    tables = _expert_tables(model)
    if not tables:
        raise ValueError(f"{type(model).__name__} has no hf-arch expert tables (sparse layers) to shard")
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    plan = ExpertParallelPlan(model, group, world)
    for name, experts in tables:
        if getattr(experts, "shard", None) is not None:
            raise ValueError(f"{name}: experts are already sharded")
        total = experts.num_experts
        if total % world:
            raise ValueError(f"{name}: {total} experts do not divide over {world} processes (expert parallelism "
                             "gives every process the same number)")
        count = total // world
        first = rank * count
        with torch.no_grad():
            experts.gate_up_proj = torch.nn.Parameter(experts.gate_up_proj[first:first + count].clone())
            experts.down_proj = torch.nn.Parameter(experts.down_proj[first:first + count].clone())
        experts.shard = ExpertShard(group, rank, world, first, count, total)
        experts.parallel_dispatch = functools.partial(expert_parallel_mlp, shard=experts.shard)
        prefix = f"{name}." if name else ""
        plan.expert_parameters += [prefix + "gate_up_proj", prefix + "down_proj"]
    if data_parallel_wrapper:
        model._ddp_params_and_buffers_to_ignore = list(plan.expert_parameters)  # read by DistributedDataParallel
        for name, p in model.named_parameters():
            if name in plan.expert_parameters:
                p.register_hook(lambda grad: grad / world)
        plan.wrapped = True
    return plan


@torch.no_grad()
def gather_experts(model) -> None:
    """Undo :func:`shard_experts`: every rank gets the full expert tables back (for saving or evaluation alone)."""
    for _, experts in _expert_tables(model):
        shard = getattr(experts, "shard", None)
        if shard is None:
            continue
        for attr in ("gate_up_proj", "down_proj"):
            local = getattr(experts, attr).contiguous()
            parts = [torch.empty_like(local) for _ in range(shard.world)]
            dist.all_gather(parts, local, group=shard.group)
            setattr(experts, attr, torch.nn.Parameter(torch.cat(parts)))
        experts.shard = experts.parallel_dispatch = None


def _padded_gather(t: torch.Tensor, length: int, shard: ExpertShard) -> torch.Tensor:
    """Every rank's ``t`` padded to ``length`` rows, stacked ``[W · length, ...]`` (differentiable)."""
    padded = torch.cat([t, t.new_zeros((length - t.shape[0], *t.shape[1:]))]) if t.shape[0] < length else t
    return all_gather_stacked(padded, shard.group, shard.rank).flatten(0, 1)


def expert_parallel_mlp(x: torch.Tensor, token_idx: torch.LongTensor, expert_idx: torch.LongTensor,
                        weight: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor,
                        shard: ExpertShard) -> torch.Tensor:
    """:func:`weighted_expert_mlp` over experts spread across ``shard.group``: this rank's tokens ``x [N, H]`` and
    their assignments (global expert ids) in, their routed output ``[N, H]`` out."""
    counts = torch.tensor([x.shape[0], token_idx.numel()], dtype=torch.long)
    every = [torch.empty_like(counts) for _ in range(shard.world)]
    dist.all_gather(every, counts, group=shard.group)
    tokens = [int(c[0]) for c in every]
    pairs = [int(c[1]) for c in every]
    n_max, a_max = max(tokens), max(pairs)
    all_x = _padded_gather(x, n_max, shard)  # [W · n_max, H]
    all_weight = _padded_gather(weight, a_max, shard)  # [W · a_max]
    with torch.no_grad():
        offsets = torch.arange(shard.world, device=x.device).repeat_interleave(a_max) * n_max
        all_tokens = _padded_gather(token_idx, a_max, shard) + offsets
        all_experts = _padded_gather(expert_idx, a_max, shard)
        real = torch.cat([torch.arange(a_max, device=x.device) < p for p in pairs])
        mine = real & (all_experts >= shard.first) & (all_experts < shard.first + shard.count)
    contribution = weighted_expert_mlp(all_x, all_tokens[mine], all_experts[mine] - shard.first, all_weight[mine],
                                       gate_up, down)
    # Every rank's backward must reach both collectives, even a rank none of whose experts was chosen.
    contribution = contribution + 0 * (all_x.sum() + all_weight.sum())
    summed = all_reduce_sum(contribution, shard.group)
    start = shard.rank * n_max
    return summed[start:start + x.shape[0]]
