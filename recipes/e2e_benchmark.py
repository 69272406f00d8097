"""End-to-end speed a user feels: prefill tokens/s, decode ms/token, cache size and peak memory against context, for
conversions of one source checkpoint side by side with the source itself (``hf-arch bench e2e SRC``).

Each model runs in its own child process (so peak memory is that model's alone): the child loads the source, converts
it in memory (untrained: speed does not depend on the weights, except Seer's density, fixed here by a token budget),
then for each context, shortest first, times a prefill of ``context`` tokens and ``decode_tokens`` cached greedy steps
after it (medians over ``repeats`` after one warm-up), and records the cache's bytes (every tensor it holds) and the
peak memory of that context's runs (CUDA: ``max_memory_allocated``; CPU: the resident high-water mark, reset before
each context where Linux allows, else the process's lifetime peak, hence shortest context first). Prefill keeps the
last position's logits only, as ``generate()`` does. Nothing here asserts a speed; the command writes JSON, a markdown table and a plot.

    OMP_NUM_THREADS=2 hf-arch bench e2e /tmp/smol/fp32 --contexts 512 2048 8192 --out /tmp/e2e
"""

from __future__ import annotations

import gc
import json
import multiprocessing
import resource
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

__all__ = ["E2E_MODELS", "benchmark_e2e", "format_e2e_table", "plot_e2e"]


@dataclass(frozen=True)
class E2EModel:
    """A conversion of the source (``to`` None: the source itself) and what it is, for the table."""

    to: str | None
    options: dict = field(default_factory=dict)
    label: str = ""


# Speed does not depend on the weights: conversions skip what only sets quality (random MoE split, no router fitting;
# the shared expert, which does cost time, is kept, picked on random tokens).
E2E_MODELS = {
    "source": E2EModel(None, label="the source checkpoint"),
    "gated_attention": E2EModel("gated_attention", label="headwise output gates"),
    "mamba_init": E2EModel("gated_deltanet", {"method": "mamba_init"}, "all layers Gated DeltaNet"),
    "liger": E2EModel("gla", {"method": "liger"}, "all layers GLA + 64-token window (Liger)"),
    "moe_half": E2EModel("moe", {"method": "partition", "experts": 8, "top_k": 4, "split": "random",
                                 "router_distill_steps": 0}, "MoE partition, 4 of 8 experts active"),
    "seer_half": E2EModel("sparse_attention", {"method": "seer", "selection": "budget"},
                          "SeerAttention, budget of a quarter of the context (about half the causal blocks)"),
}


def _cache_bytes(cache) -> int:
    """Bytes of every distinct tensor reachable from the cache object (keys/values, recurrent and conv states)."""
    seen, total, stack = set(), 0, [cache]
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            total += obj.numel() * obj.element_size()
        elif isinstance(obj, (list, tuple)):
            stack.extend(obj)
        elif isinstance(obj, dict):
            stack.extend(obj.values())
        elif hasattr(obj, "__dict__") and type(obj).__module__.split(".")[0] in ("transformers", "hf_arch"):
            stack.extend(vars(obj).values())
    return total


def _reset_peak_memory(device: str) -> None:
    """Start a new peak: CUDA's allocator statistics, or Linux's resident high-water mark (``clear_refs`` 5), so a
    context's peak is not the conversion's (which held the source and the converted model at once)."""
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:  # not Linux, or not allowed: the peak stays the process's lifetime high-water mark
        pass


def _peak_memory_mb(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux


def _resident_mb(device: str) -> float:
    if device == "cuda":
        return torch.cuda.memory_allocated() / 2**20
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def _build(source: str, spec: E2EModel, device: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    import hf_arch  # noqa: F401  (registration)

    from ..conversion.api import CONVERSIONS, conversion_options

    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    if spec.to is None:
        return model.to(device).eval()
    extra = {}
    if spec.to == "moe":  # the shared expert's neurons are picked on calibration text: random tokens do for speed
        ids = torch.randint(0, model.config.vocab_size, (4, 256), generator=torch.Generator().manual_seed(0))
        extra["calibration_ids"] = ids
    model = CONVERSIONS[spec.to].convert(model, conversion_options(spec.to, **spec.options), **extra)
    return model.to(device).eval()


def _measure_one_model(source: str, name: str, contexts: list[int], decode_tokens: int, repeats: int,
                       device: str, dtype_name: str) -> list[dict]:
    from ..models.cache_names import CACHE_OUTPUT_FIELD
    from .benchmark import sync_device, timed_greedy_decode

    spec = E2E_MODELS[name]
    dtype = getattr(torch, dtype_name)
    model = _build(source, spec, device, dtype)
    vocab = model.config.vocab_size
    loaded_mb = _peak_memory_mb(device)
    rows = []
    for context in sorted(contexts):
        if spec.to == "sparse_attention":  # a quarter of the context: about half the causal blocks
            model.config.sparse_attn_token_budget = max(model.config.sparse_attn_block_size, context // 4)
        ids = torch.randint(0, vocab, (1, context), generator=torch.Generator().manual_seed(context)).to(device)
        prefill_s, decode_s = [], []
        gc.collect()
        before_mb = _resident_mb(device)
        _reset_peak_memory(device)
        with torch.no_grad():
            for repeat in range(repeats + 1):  # the first is a warm-up
                start = time.perf_counter()
                out = model(ids, use_cache=True, logits_to_keep=1)  # as generate() prefills: the last logits only
                sync_device(device)
                prefill = time.perf_counter() - start
                out, per_token = timed_greedy_decode(model, out, decode_tokens, device)
                if repeat:
                    prefill_s.append(prefill)
                    decode_s.append(per_token)
        prefill = statistics.median(prefill_s)
        rows.append({"model": name, "context": context, "prefill_tokens_per_s": context / prefill,
                     "prefill_s": prefill, "decode_ms_per_token": statistics.median(decode_s) * 1e3,
                     "cache_mb": _cache_bytes(getattr(out, CACHE_OUTPUT_FIELD)) / 2**20, "peak_memory_mb": _peak_memory_mb(device),
                     "resident_before_mb": before_mb, "memory_after_load_mb": loaded_mb, "decode_tokens": decode_tokens, "repeats": repeats})
        del out
    return rows


def _child(queue, *args) -> None:
    try:
        queue.put(("ok", _measure_one_model(*args)))
    except BaseException as error:  # reported by the parent with the model's name
        queue.put(("error", f"{type(error).__name__}: {error}"))


def benchmark_e2e(source: str, models=tuple(E2E_MODELS), contexts=(512, 2048, 8192), decode_tokens: int = 16,
                  repeats: int = 2, device: str = "cpu", dtype: str = "float32", isolate: bool = True,
                  progress: bool = True) -> list[dict]:
    """Rows ``{model, context, prefill_tokens_per_s, decode_ms_per_token, cache_mb, peak_memory_mb, ...}``.

    ``isolate``: each model in a fresh child process (peak memory per model); False runs them here (tests)."""
    from tqdm.auto import tqdm

    unknown = sorted(set(models) - set(E2E_MODELS))
    if unknown:
        raise ValueError(f"models {unknown} are not in the e2e benchmark; known: {sorted(E2E_MODELS)}")
    if not contexts or min(contexts) < 1:
        raise ValueError(f"contexts must be positive token counts, got {list(contexts)}")
    rows = []
    for name in tqdm(models, desc="e2e", disable=not progress):
        args = (str(source), name, list(contexts), decode_tokens, repeats, device, dtype)
        if not isolate:
            rows += _measure_one_model(*args)
            continue
        ctx = multiprocessing.get_context("spawn")  # a clean process: its peak memory is this model's alone
        queue = ctx.Queue()
        child = ctx.Process(target=_child, args=(queue, *args))
        child.start()
        status, payload = queue.get()
        child.join()
        if status != "ok":
            raise RuntimeError(f"e2e benchmark of {name!r} failed: {payload}")
        rows += payload
    return rows


def format_e2e_table(rows: list[dict]) -> str:
    """Markdown, one row per (model, context), with ratios to the source at the same context (>1: faster / smaller
    than the source for speed, larger for memory)."""
    source = {r["context"]: r for r in rows if r["model"] == "source"}
    lines = ["| model | context | prefill tok/s | × source | decode ms/token | × source | cache MB | peak MB |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        s = source.get(r["context"])
        prefill_ratio = f"{r['prefill_tokens_per_s'] / s['prefill_tokens_per_s']:.2f}" if s else "-"
        decode_ratio = f"{s['decode_ms_per_token'] / r['decode_ms_per_token']:.2f}" if s else "-"
        lines.append(f"| {r['model']} | {r['context']} | {r['prefill_tokens_per_s']:.0f} | {prefill_ratio} | "
                     f"{r['decode_ms_per_token']:.2f} | {decode_ratio} | {r['cache_mb']:.1f} | "
                     f"{r['peak_memory_mb']:.0f} |")
    return "\n".join(lines)


def plot_e2e(rows: list[dict], path: Path) -> None:
    """Decode ms/token, cache MB and prefill tokens/s against context, one line per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    panels = [("decode_ms_per_token", "decode ms / token"), ("cache_mb", "cache MB"),
              ("prefill_tokens_per_s", "prefill tokens / s")]
    for name in dict.fromkeys(r["model"] for r in rows):
        mine = sorted((r for r in rows if r["model"] == name), key=lambda r: r["context"])
        for ax, (key, _) in zip(axes, panels):
            ax.plot([r["context"] for r in mine], [r[key] for r in mine], marker="o", label=name)
    for ax, (_, title) in zip(axes, panels):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context (tokens)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


def main(argv=None) -> int:
    import argparse

    from ..atomic_io import atomic_write_text

    parser = argparse.ArgumentParser(prog="hf-arch bench e2e", description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="source checkpoint directory (a Llama-family causal LM)")
    parser.add_argument("--models", nargs="+", default=list(E2E_MODELS), choices=list(E2E_MODELS))
    parser.add_argument("--contexts", type=int, nargs="+", default=[512, 2048, 8192])
    parser.add_argument("--decode-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default cuda if available")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="default float32 on CPU, bfloat16 on CUDA")
    parser.add_argument("--out", type=Path, help="write e2e.json, e2e.md and e2e.png here")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON instead of the table")
    args = parser.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("bfloat16" if device == "cuda" else "float32")
    rows = benchmark_e2e(args.source, args.models, args.contexts, args.decode_tokens, args.repeats, device, dtype)
    result = {"source": str(args.source), "device": device, "dtype": dtype, "torch": torch.__version__,
              "threads": torch.get_num_threads(), "rows": rows}
    table = format_e2e_table(rows)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.out / "e2e.json", json.dumps(result, indent=2) + "\n")
        atomic_write_text(args.out / "e2e.md", table + "\n")
        plot_e2e(rows, args.out / "e2e.png")
    print(json.dumps(result, indent=2) if args.json else table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
