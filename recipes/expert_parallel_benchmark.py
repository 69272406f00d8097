"""``hf-arch bench expert-parallel``: MoE training steps with every expert in one process against the experts
sharded over N processes (``hf_arch.expert_parallel``), the same tokens in total.

    hf-arch bench expert-parallel --experts 8 32 --world-sizes 1 2 [--json]

Per configuration: a small MoE LM (``--hidden``, ``--layers``, top-2, expert width ``2·hidden``); ``N`` processes
each train on their own batch of ``--tokens / N`` tokens (one process: all of them), forward + backward + the
gradient reduction; reported: tokens per second (the total over the slowest rank's median step), the expert
parameters each rank holds, and each rank's peak resident memory above what it held before the first step. On one
machine the ranks share its cores: the memory per rank is the point, not a cluster's speed. Nothing here asserts a
speed.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import time
from pathlib import Path

import torch

from .distributed_launch import run_ranks

__all__ = ["benchmark_expert_parallel", "format_expert_parallel_table", "main"]


def _model(hidden: int, layers: int, experts: int):
    from transformers import AutoModelForCausalLM

    import hf_arch

    config = hf_arch.MoEConfig(vocab_size=4096, hidden_size=hidden, intermediate_size=4 * hidden,
                               num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
                               num_experts=experts, num_experts_per_tok=2, moe_intermediate_size=2 * hidden,
                               max_position_embeddings=4096)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).train()


def _worker(args) -> None:
    import torch.distributed as dist

    world = int(os.environ["WORLD_SIZE"])
    plan = None
    model = _model(args.hidden, args.layers, args.experts)
    if world > 1:
        from hf_arch.expert_parallel import shard_experts

        dist.init_process_group("gloo")
        plan = shard_experts(model)
    rank = dist.get_rank() if world > 1 else 0
    rows = args.tokens // args.seq_len // world
    ids = torch.randint(0, 4096, (rows, args.seq_len), generator=torch.Generator().manual_seed(rank))
    expert_params = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def step():
        model.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        if plan is not None:
            plan.reduce_gradients()

    times = []
    for _ in range(args.repeats + 1):  # the first is a warm-up
        if world > 1:
            dist.barrier()
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before
    Path(args.worker_out, f"rank{rank}.json").write_text(json.dumps(
        {"rank": rank, "step_s": statistics.median(times[1:]), "peak_mb": peak, "expert_params": expert_params,
         "tokens": ids.numel()}))
    if world > 1:
        dist.destroy_process_group()


def benchmark_expert_parallel(experts=(8, 32), world_sizes=(1, 2), hidden: int = 256, layers: int = 4,
                              tokens: int = 4096, seq_len: int = 256, repeats: int = 3, cores: int | None = None,
                              progress: bool = True) -> list[dict]:
    from tqdm.auto import tqdm

    cores = cores or os.cpu_count() or 1
    rows = []
    bar = tqdm(total=len(experts) * len(world_sizes), desc="expert parallel", disable=not progress)
    for E in experts:
        for world in world_sizes:
            if E % world:
                raise ValueError(f"bench expert-parallel: {E} experts do not divide over {world} processes")
            if tokens // seq_len < world:
                raise ValueError(f"bench expert-parallel: --tokens {tokens} is fewer than one {seq_len}-token row "
                                 f"per process for {world} processes")
            bar.set_postfix_str(f"E={E} world={world}")
            threads = max(1, cores // world)
            ranks = run_ranks("hf_arch.recipes.expert_parallel_benchmark", world,
                              ["--experts-one", str(E), "--hidden", str(hidden), "--layers", str(layers),
                               "--tokens", str(tokens), "--seq-len", str(seq_len), "--repeats", str(repeats)],
                              threads, f"bench expert-parallel at E={E}")
            step = max(r["step_s"] for r in ranks)
            total = sum(r["tokens"] for r in ranks)
            rows.append({"experts": E, "world_size": world, "threads_per_rank": threads, "tokens": total,
                         "step_ms": step * 1e3, "tokens_per_s": total / step,
                         "expert_params_per_rank": ranks[0]["expert_params"],
                         "peak_mb_per_rank": [round(r["peak_mb"], 1) for r in ranks]})
            bar.update(1)
    bar.close()
    return rows


def format_expert_parallel_table(rows: list[dict]) -> str:
    lines = ["| experts | processes | threads each | tokens | step ms | tokens/s | expert params per rank | "
             "peak MB per rank (step) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['experts']} | {r['world_size']} | {r['threads_per_rank']} | {r['tokens']} | "
                     f"{r['step_ms']:.0f} | {r['tokens_per_s']:.0f} | {r['expert_params_per_rank']:,} | "
                     f"{', '.join(f'{m:.0f}' for m in r['peak_mb_per_rank'])} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hf-arch bench expert-parallel", description=__doc__.split("\n\n")[0])
    parser.add_argument("--experts", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per step over all processes")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cores", type=int, default=None, help="cores to split between the ranks (default all)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    parser.add_argument("--experts-one", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker_out:
        args.experts = args.experts_one
        _worker(args)
        return 0
    rows = benchmark_expert_parallel(args.experts, args.world_sizes, args.hidden, args.layers, args.tokens,
                                     args.seq_len, args.repeats, args.cores)
    result = {"torch": torch.__version__, "cores": args.cores or os.cpu_count(), "rows": rows}
    print(json.dumps(result, indent=1) if args.json else format_expert_parallel_table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
