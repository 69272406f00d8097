"""``hf-arch bench routers``: every registered MoE router trained from scratch on the same TinyStories tokens, side by
side: validation loss, experts per token and the largest expert's load against the mean.

    hf-arch bench routers --out DIR [--routers softmax_topk sinkhorn ...] [--steps 200]

The models differ only in ``moe_router`` (and the preset that goes with it: Sinkhorn and THOR train without the
load-balance loss, the others with 0.01); hidden 64, 4 layers, 8 experts of width 64, top-2 (DynaMoE: up to 2).
Writes ``DIR/routers.json`` and a Markdown table. Small and short: a sanity check that each router trains, not a
ranking of the papers.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import torch

from ..atomic_io import atomic_write_text
from .recovery_benchmark import _assets
from .scratch_comparison import TOKENIZER_DIR, BlockStream, load_token_data, validation_loss

__all__ = ["ROUTER_SETTINGS", "compare_routers", "format_router_table", "main"]

ROUTER_SETTINGS = {
    "softmax_topk": {},
    "sigmoid_topk": {"moe_router": "sigmoid_topk"},
    "norm_router": {"moe_router": "norm_router"},
    "tempered_topk": {"moe_router": "tempered_topk"},
    "relu_rmsnorm": {"moe_preset": "blockffn"},
    "sinkhorn": {"moe_preset": "sinkhorn"},
    "stochastic": {"moe_preset": "thor"},
    "activation_dense_to_sparse": {"moe_router": "activation_dense_to_sparse"},
    "sqrt_gate": {"moe_router": "sqrt_gate"},
    "dynamic_topk": {"moe_router": "dynamic_topk"},
    "pre_gated": {"moe_router": "pre_gated", "moe_pre_gate_hidden": 64},
}


def compare_routers(routers, steps: int = 200, seed: int = 0, progress: bool = True) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments, default_data_collator
    from transformers import set_seed

    import hf_arch
    from hf_arch.layers.moe_stats import disable_routing_stats, enable_routing_stats

    assets = _assets()
    tokenizer = AutoTokenizer.from_pretrained(assets / TOKENIZER_DIR)
    tokenizer.model_max_length = 10**9
    data = load_token_data(assets, tokenizer, 256, 0.05)
    order = torch.randperm(len(data.train_blocks), generator=torch.Generator().manual_seed(seed))
    stream = data.train_blocks[order].repeat(steps * 8 // len(order) + 1, 1)[: steps * 8]
    val = data.val_blocks[:32]
    rows = []
    for name in routers:
        if name not in ROUTER_SETTINGS:
            raise ValueError(f"bench routers: unknown router {name!r}; known: {sorted(ROUTER_SETTINGS)}")
        set_seed(seed)
        config = hf_arch.MoEConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, num_experts=8,
                                   num_experts_per_tok=2, moe_intermediate_size=64, max_position_embeddings=512,
                                   **ROUTER_SETTINGS[name])
        model = AutoModelForCausalLM.from_config(config)
        start = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="hfa-routers-") as work:
            args = TrainingArguments(output_dir=work, max_steps=steps, per_device_train_batch_size=8,
                                     learning_rate=3e-3, warmup_steps=steps // 20, lr_scheduler_type="cosine",
                                     report_to=[], save_strategy="no", use_cpu=True, seed=seed, logging_steps=steps,
                                     disable_tqdm=not progress)
            trainer = Trainer(model=model, args=args, train_dataset=BlockStream(stream),
                              data_collator=default_data_collator)
            trainer.train()
        seconds = time.perf_counter() - start
        stats = enable_routing_stats(model)
        loss = validation_loss(model, val, 8)
        summary = stats.summary()
        disable_routing_stats(model)
        rows.append({"router": name, "settings": ROUTER_SETTINGS[name], "val_loss": loss,
                     "train_loss": trainer.state.log_history[-1].get("train_loss"),
                     "experts_per_token": summary.get("moe/active_experts_per_token"),
                     "max_load_ratio": summary.get("moe/max_load_ratio"), "train_seconds": round(seconds, 1)})
    return {"steps": steps, "tokens": steps * 8 * 256, "val_blocks": len(val), "seed": seed, "rows": rows}


def format_router_table(result: dict) -> str:
    lines = [f"{result['steps']} steps × 8 × 256 tokens ({result['tokens']:,}), validation on {result['val_blocks']} "
             "held-out blocks of 256", "",
             "| router | val loss | val ppl | experts / token | max load / mean | train s |", "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        experts = "-" if r["experts_per_token"] is None else f"{r['experts_per_token']:.2f}"
        load = "-" if r["max_load_ratio"] is None else f"{r['max_load_ratio']:.2f}"
        lines.append(f"| {r['router']} | {r['val_loss']:.4f} | {math.exp(r['val_loss']):.2f} | {experts} | {load} | "
                     f"{r['train_seconds']:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="hf-arch bench routers", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--routers", nargs="+", default=list(ROUTER_SETTINGS))
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if (out / "routers.json").exists() and not args.overwrite:
        raise SystemExit(f"hf-arch bench routers: {out / 'routers.json'} exists; pass --overwrite to replace it")
    result = compare_routers(args.routers, args.steps, args.seed)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "routers.json", json.dumps(result, indent=1))
    atomic_write_text(out / "routers.md", format_router_table(result) + "\n")
    print(format_router_table(result))
    return 0 if all(math.isfinite(r["val_loss"]) for r in result["rows"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
