"""transformers' own Qwen3-Next on CPU with and without :func:`hf_arch.use_kernels`: a training step (forward +
backward at each sequence length) and cached greedy decode (ms per token after prefilling each context), both models
built from the same weights and timed alternately in one run (``hf-arch bench hub-kernels --json``).

The model is small (hidden 256, 4 layers: three Gated DeltaNet layers to one full-attention layer, as Qwen3-Next,
with its MoE feed-forward) so that the sequence mixer's share of the time is what a real model would show at these
lengths. Nothing here asserts a speed.
"""

from __future__ import annotations

import copy
import statistics
import time

import torch

from .benchmark import _median_seconds, timed_greedy_decode

__all__ = ["benchmark_hub_kernels", "format_hub_kernel_table", "tiny_qwen3_next"]


def tiny_qwen3_next(hidden_size: int = 256, layers: int = 4, vocab_size: int = 1024, seed: int = 0):
    from transformers import Qwen3NextConfig, Qwen3NextForCausalLM

    heads = hidden_size // 64
    config = Qwen3NextConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=max(1, heads // 2), head_dim=64, linear_key_head_dim=64,
        linear_value_head_dim=64, linear_num_key_heads=heads, linear_num_value_heads=heads, num_experts=8,
        num_experts_per_tok=2, moe_intermediate_size=hidden_size, shared_expert_intermediate_size=hidden_size,
        layer_types=[("full_attention" if (i + 1) % 4 == 0 else "linear_attention") for i in range(layers)],
        max_position_embeddings=1 << 16)
    torch.manual_seed(seed)
    return Qwen3NextForCausalLM(config).float()


def benchmark_hub_kernels(seq_lens=(512, 2048, 8192), decode_contexts=(512, 2048, 8192), decode_tokens: int = 16,
                          repeats: int = 3, progress: bool = True) -> dict:
    """``{"training": rows, "decode": rows}``; each row times ``transformers`` (its fallbacks) and ``hf_arch``
    (after ``use_kernels``) on the same inputs, alternating repeats, medians after a warm-up."""
    from tqdm.auto import tqdm

    import hf_arch

    fallback = tiny_qwen3_next()
    ours = hf_arch.use_kernels(copy.deepcopy(fallback).train())
    models = {"transformers": fallback.train(), "hf_arch": ours}
    vocab = fallback.config.vocab_size
    bar = tqdm(total=len(seq_lens) + len(decode_contexts), desc="hub kernels", disable=not progress)

    training = []
    for T in seq_lens:
        ids = torch.randint(0, vocab, (1, T), generator=torch.Generator().manual_seed(T))
        row = {"T": T}
        for name, model in models.items():
            def step(model=model):
                model.zero_grad(set_to_none=True)
                model(ids, labels=ids, use_cache=False).loss.backward()
            row[f"{name}_ms"] = _median_seconds(step, repeats) * 1e3
        row["speedup"] = row["transformers_ms"] / row["hf_arch_ms"]
        training.append(row)
        bar.update(1)

    for model in models.values():
        model.eval()
    # Inference-mode kernelization (transformers keeps the mode the model was kernelized with).
    hf_arch.use_kernels(ours)
    decode = []
    with torch.no_grad():
        for context in decode_contexts:
            ids = torch.randint(0, vocab, (1, context), generator=torch.Generator().manual_seed(context))
            times = {name: [] for name in models}
            for _ in range(repeats + 1):  # the first round warms up
                for name, model in models.items():
                    start = time.perf_counter()
                    prefill = model(ids, use_cache=True)
                    prefill_s = time.perf_counter() - start
                    times[name].append((prefill_s, timed_greedy_decode(model, prefill, decode_tokens)[1]))
            row = {"context": context, "decode_tokens": decode_tokens}
            for name, values in times.items():
                row[f"{name}_prefill_ms"] = statistics.median(v[0] for v in values[1:]) * 1e3
                row[f"{name}_ms_per_token"] = statistics.median(v[1] for v in values[1:]) * 1e3
            row["prefill_speedup"] = row["transformers_prefill_ms"] / row["hf_arch_prefill_ms"]
            row["decode_speedup"] = row["transformers_ms_per_token"] / row["hf_arch_ms_per_token"]
            decode.append(row)
            bar.update(1)
    bar.close()
    return {"model": {"type": "qwen3_next", **{k: getattr(fallback.config, k) for k in (
        "hidden_size", "num_hidden_layers", "layer_types", "num_experts", "num_experts_per_tok")}},
        "training": training, "decode": decode}


def format_hub_kernel_table(results: dict) -> str:
    lines = ["| training step (fwd+bwd), T | transformers ms | hf_arch ms | speed-up |", "|---|---|---|---|"]
    lines += [f"| {r['T']} | {r['transformers_ms']:.1f} | {r['hf_arch_ms']:.1f} | {r['speedup']:.2f}× |"
              for r in results["training"]]
    lines += ["", "| decode, context | prefill ms (transformers / hf_arch) | ms/token (transformers / hf_arch) "
                  "| prefill speed-up | decode speed-up |", "|---|---|---|---|---|"]
    lines += [f"| {r['context']} | {r['transformers_prefill_ms']:.1f} / {r['hf_arch_prefill_ms']:.1f} | "
              f"{r['transformers_ms_per_token']:.2f} / {r['hf_arch_ms_per_token']:.2f} | "
              f"{r['prefill_speedup']:.2f}× | {r['decode_speedup']:.2f}× |" for r in results["decode"]]
    return "\n".join(lines)
