"""``hf-arch bench sequence-parallel``: LASP-2 training steps against sequence length, 1 process vs N.

    hf-arch bench sequence-parallel --seq-lens 2048 8192 32768 --world-sizes 1 2 [--model hybrid] [--json]

For each world size and length, that many processes (torch.distributed, gloo on CPU, rendezvous on loopback) each
hold one chunk of one sequence and time a training step of a small model (forward + backward + the gradient
all-reduce; the LASP-2 path for N > 1, the plain model for 1). Reported per configuration: tokens per second (the
sequence's tokens over the slowest rank's median step) and each rank's peak resident memory above what it held
before the first step (the activations and the exchange; a fresh process per configuration, so peaks do not
carry over). On one machine the ranks share its cores: the point is memory per rank and how the step scales, not a
cluster's speed-up. Nothing here asserts a speed.
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

__all__ = ["benchmark_sequence_parallel", "format_sequence_parallel_table", "main"]

MODELS = ("gated_deltanet", "hybrid")


def _model(kind: str, hidden: int, layers: int):
    from transformers import AutoModelForCausalLM

    import hf_arch

    types = ["linear_attention"] * layers
    if kind == "hybrid":  # one softmax layer in four, as the hybrids' usual 3:1
        types = ["full_attention" if (i + 1) % 4 == 0 else "linear_attention" for i in range(layers)]
    config = hf_arch.GatedDeltaNetConfig(vocab_size=1024, hidden_size=hidden, intermediate_size=2 * hidden,
                                         num_hidden_layers=layers, num_attention_heads=hidden // 64,
                                         num_key_value_heads=hidden // 64, layer_types=types,
                                         max_position_embeddings=1 << 17)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).train()


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes


def _worker(args) -> None:
    import torch.distributed as dist

    from hf_arch.sequence_parallel import (all_reduce_gradients, sequence_parallel, sequence_parallel_loss,
                                           split_batch)

    world = int(os.environ["WORLD_SIZE"])
    if world > 1:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if world > 1 else 0
    model = _model(args.model, args.hidden, args.layers)
    ids = torch.randint(0, 1024, (1, args.seq_len), generator=torch.Generator().manual_seed(args.seq_len))
    chunk = split_batch({"input_ids": ids}, rank, world)
    group = dist.new_group(list(range(world))) if world > 1 else None
    before = _rss_mb()

    def step():
        model.zero_grad(set_to_none=True)
        if world == 1:
            model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
            return
        with sequence_parallel(group, total_length=chunk["total_length"]):
            sequence_parallel_loss(model, chunk).backward()
        all_reduce_gradients(model, group)

    times = []
    for _ in range(args.repeats + 1):  # the first is a warm-up
        if world > 1:
            dist.barrier()
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    result = {"rank": rank, "step_s": statistics.median(times[1:]), "peak_mb": _rss_mb() - before,
              "rss_before_mb": before}
    Path(args.worker_out, f"rank{rank}.json").write_text(json.dumps(result))
    if world > 1:
        dist.destroy_process_group()


def _run_configuration(model: str, seq_len: int, world: int, hidden: int, layers: int, repeats: int,
                       threads: int) -> dict:
    ranks = run_ranks("hf_arch.recipes.sequence_parallel_benchmark", world,
                      ["--model", model, "--seq-len", str(seq_len), "--hidden", str(hidden), "--layers", str(layers),
                       "--repeats", str(repeats)], threads, f"bench sequence-parallel at T={seq_len}")
    step = max(r["step_s"] for r in ranks)
    return {"model": model, "T": seq_len, "world_size": world, "threads_per_rank": threads,
            "step_ms": step * 1e3, "tokens_per_s": seq_len / step,
            "peak_mb_per_rank": [round(r["peak_mb"], 1) for r in ranks]}


def benchmark_sequence_parallel(seq_lens=(2048, 8192, 32768), world_sizes=(1, 2), model: str = "hybrid",
                                hidden: int = 256, layers: int = 4, repeats: int = 2, cores: int | None = None,
                                progress: bool = True) -> list[dict]:
    """Rows per (T, world size); the machine's ``cores`` (default: all) are split evenly between the ranks."""
    from tqdm.auto import tqdm

    if model not in MODELS:
        raise ValueError(f"bench sequence-parallel: --model must be one of {MODELS}, got {model!r}")
    cores = cores or os.cpu_count() or 1
    rows = []
    bar = tqdm(total=len(seq_lens) * len(world_sizes), desc="sequence parallel", disable=not progress)
    for T in seq_lens:
        for world in world_sizes:
            if T < world:
                raise ValueError(f"bench sequence-parallel: T={T} cannot be split across {world} processes")
            bar.set_postfix_str(f"T={T} world={world}")
            rows.append(_run_configuration(model, T, world, hidden, layers, repeats, max(1, cores // world)))
            bar.update(1)
    bar.close()
    return rows


def format_sequence_parallel_table(rows: list[dict]) -> str:
    lines = ["| model | T | processes | threads each | step ms | tokens/s | peak MB per rank (step) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['T']} | {r['world_size']} | {r['threads_per_rank']} | {r['step_ms']:.0f} | "
                     f"{r['tokens_per_s']:.0f} | {', '.join(f'{m:.0f}' for m in r['peak_mb_per_rank'])} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hf-arch bench sequence-parallel", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[2048, 8192, 32768])
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--model", choices=MODELS, default="hybrid")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--cores", type=int, default=None, help="cores to split between the ranks (default all)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    parser.add_argument("--seq-len", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker_out:
        _worker(args)
        return 0
    rows = benchmark_sequence_parallel(tuple(args.seq_lens), tuple(args.world_sizes), args.model, args.hidden,
                                       args.layers, args.repeats, args.cores)
    result = {"torch": torch.__version__, "cores": args.cores or os.cpu_count(), "rows": rows}
    print(json.dumps(result, indent=2) if args.json else format_sequence_parallel_table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
