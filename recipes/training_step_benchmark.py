"""Does ``torch.compile`` pay for recovery training on this machine? Full fine-tuning steps, eager against compiled.

    python -m hf_arch.recipes.training_step_benchmark SRC --methods source lolcats mamba_init \
        --batch-size 8 --block-size 256 --steps 10 --json

Each method is the source itself (``source``) or a linearization of it (``--method`` of ``hf-arch convert --to
gla|gated_deltanet``); each mode builds the model afresh and times AdamW steps of next-token loss on fixed random
tokens: the first step (compilation included) and the mean of the next ``--steps``. A stage of ``T`` seconds trains
about ``(T − first) / step`` steps in each mode, so compiling pays for stages longer than ``break_even_minutes``. Set ``OMP_NUM_THREADS`` for the thread count you train with. Compilation is fast again
once inductor's on-disk cache holds the same graphs (a rerun, or the next stage of a recipe); ``--cold-cache``
compiles into a fresh cache directory to time a first run.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import tempfile
import time

import torch

MODES = ("eager", "compiled")


def build(source: str, method: str):
    from transformers import AutoModelForCausalLM

    from ..conversion.linearize import LinearizeOptions, linearize

    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    if method != "source":
        model = linearize(model, LinearizeOptions(method=method))
    return model.train()


def time_steps(model, ids: torch.Tensor, steps: int, compiled: bool) -> dict:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    forward = torch.compile(model) if compiled else model

    def step():
        optimizer.zero_grad()
        forward(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        optimizer.step()

    started = time.perf_counter()
    step()
    first = time.perf_counter() - started
    started = time.perf_counter()
    for _ in range(steps):
        step()
    per_step = (time.perf_counter() - started) / steps
    return {"first_step_s": round(first, 3), "step_s": round(per_step, 4), "tokens_per_s": round(ids.numel() / per_step)}


def run(source: str, methods: list[str], batch_size: int, block_size: int, steps: int,
        modes: tuple[str, ...] = MODES) -> dict:
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(source).vocab_size
    ids = torch.randint(0, vocab, (batch_size, block_size), generator=torch.Generator().manual_seed(0))
    rows = []
    for method in methods:
        row = {"method": method}
        for mode in modes:
            row[mode] = time_steps(build(source, method), ids, steps, compiled=mode == "compiled")
            torch._dynamo.reset()  # compiled graphs hold the model: free it before the next one is built
            gc.collect()
        if set(MODES) <= set(modes):
            eager, compiled = row["eager"], row["compiled"]
            row["speedup"] = round(eager["step_s"] / compiled["step_s"], 3)
            # Equal steps in a stage of T seconds: (T - first_c) / step_c = (T - first_e) / step_e.
            saved = eager["step_s"] - compiled["step_s"]
            even = (compiled["first_step_s"] * eager["step_s"] - eager["first_step_s"] * compiled["step_s"]) / saved
            row["break_even_minutes"] = round(even / 60, 1) if saved > 0 else None
        rows.append(row)
    return {"source": source, "batch_size": batch_size, "block_size": block_size, "steps": steps,
            "threads": torch.get_num_threads(), "rows": rows}


def format_table(result: dict) -> str:
    lines = ["| method | eager tok/s | compiled tok/s | speedup | first compiled step (s) | pays from (min) |",
             "| --- | --- | --- | --- | --- | --- |"]
    for row in result["rows"]:
        compiled = row.get("compiled", {})
        lines.append(f"| {row['method']} | {row.get('eager', {}).get('tokens_per_s', '-')} | "
                     f"{compiled.get('tokens_per_s', '-')} | {row.get('speedup', '-')} | "
                     f"{compiled.get('first_step_s', '-')} | {row.get('break_even_minutes', '-')} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="Llama-family checkpoint dir")
    parser.add_argument("--methods", nargs="+", default=["source", "lolcats", "mamba_init"],
                        help="source, or a linearization method (liger, lolcats, lizard, mamba_init)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10, help="timed steps after the first")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--cold-cache", action="store_true",
                        help="compile into a fresh inductor cache (time a first run, not a rerun)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    for name, value in (("--batch-size", args.batch_size), ("--block-size", args.block_size), ("--steps", args.steps)):
        if value < 1:
            raise SystemExit(f"{name} must be >= 1, got {value}")
    if args.cold_cache:  # read when inductor first compiles, so setting it here is in time
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="hf_arch_inductor_")
    result = run(args.source, args.methods, args.batch_size, args.block_size, args.steps, tuple(args.modes))
    result["cold_cache"] = args.cold_cache
    print(json.dumps(result, indent=2) if args.json else format_table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
