"""Wall-clock benchmark of a causal LM: prefill forward, forward+backward, and cached greedy decode.

Timings are medians over ``repeats`` after one warm-up; every attention implementation runs the same inputs.
Use ``hf-arch bench MODEL --json`` to record numbers; nothing here asserts a speed.
"""

from __future__ import annotations

import statistics
import time

import torch


def sync_device(device) -> None:
    """Wait for queued GPU work so wall-clock timings cover it (a no-op on CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed_greedy_decode(model, prefill_output, steps: int, device="cpu"):
    """``steps`` one-token cached greedy calls after a prefill's output (under the caller's ``no_grad``); returns
    (the last output, seconds per token). The shared decode loop of the kernel and end-to-end benchmarks."""
    from ..models.cache_names import CACHE_OUTPUT_FIELD

    out = prefill_output
    cache = getattr(out, CACHE_OUTPUT_FIELD)
    token = out.logits[:, -1:].argmax(-1)
    start = time.perf_counter()
    for _ in range(steps):
        out = model(token, use_cache=True, **{CACHE_OUTPUT_FIELD: cache})
        cache = getattr(out, CACHE_OUTPUT_FIELD)
        token = out.logits[:, -1:].argmax(-1)
    sync_device(device)
    return out, (time.perf_counter() - start) / max(steps, 1)


def _median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up (allocations, lazy init)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved_medians(fns: dict, repeats: int) -> dict:
    """Median seconds of each callable, timed round-robin (one call of each per round, after one warm-up round),
    so a slow patch of a shared machine or the first-measured warm-up lands on every implementation alike."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def benchmark_model(
    model_path,
    *,
    batch_size: int = 1,
    seq_len: int = 256,
    decode_tokens: int = 32,
    implementations=("eager", "sdpa"),
    repeats: int = 3,
) -> dict:
    from transformers import AutoModelForCausalLM

    import hf_arch  # noqa: F401  (registration)

    results = {
        "model": str(model_path),
        "batch_size": batch_size,
        "seq_len": seq_len,
        "decode_tokens": decode_tokens,
        "device": "cpu",
        "torch_threads": torch.get_num_threads(),
        "runs": [],
    }
    for implementation in implementations:
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32, attn_implementation=implementation)
        vocab = model.config.vocab_size
        ids = torch.randint(0, vocab, (batch_size, seq_len), generator=torch.Generator().manual_seed(0))
        model.eval()

        def forward():
            with torch.no_grad():
                model(ids, use_cache=False)

        def forward_backward():
            model.zero_grad(set_to_none=True)
            model(ids, labels=ids, use_cache=False).loss.backward()

        def decode():
            with torch.no_grad():
                model.generate(ids[:, :16], max_new_tokens=decode_tokens, min_new_tokens=decode_tokens,
                               do_sample=False, pad_token_id=0)

        fwd = _median_seconds(forward, repeats)
        model.train()
        fwd_bwd = _median_seconds(forward_backward, repeats)
        model.eval()
        dec = _median_seconds(decode, repeats)
        results["runs"].append(
            {
                "attn_implementation": implementation,
                "forward_s": fwd,
                "forward_tokens_per_s": batch_size * seq_len / fwd,
                "forward_backward_s": fwd_bwd,
                "decode_s": dec,
                "decode_tokens_per_s": batch_size * decode_tokens / dec,
            }
        )
    return results


def format_benchmark(results: dict) -> str:
    header = f"{'attn':<16}{'fwd s':>10}{'fwd tok/s':>12}{'fwd+bwd s':>12}{'decode tok/s':>14}"
    lines = [f"{results['model']}  batch {results['batch_size']} × seq {results['seq_len']}", header]
    for run in results["runs"]:
        lines.append(
            f"{run['attn_implementation']:<16}{run['forward_s']:>10.4f}{run['forward_tokens_per_s']:>12.0f}"
            f"{run['forward_backward_s']:>12.4f}{run['decode_tokens_per_s']:>14.1f}"
        )
    return "\n".join(lines)
