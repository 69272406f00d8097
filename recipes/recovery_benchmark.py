"""Recovery of converted checkpoints: convert a source, run the recovery stages, evaluate after each, plot.

    python -m hf_arch.recipes.recovery_benchmark SRC --out outputs/recovery --methods liger lolcats moe_partition
    hf-arch bench recovery SRC --out outputs/recovery [--stage1-steps 100 --stage2-steps 200] [--json]

For every method: the source, the converted model before training, after stage 1 and after stage 2 are scored on
WikiText-2 perplexity (first ``--ppl-tokens`` tokens of the test split) and zero-shot PIQA / ARC-Easy / WinoGrande
accuracy (first ``--eval-limit`` items each, acc_norm). Linearized methods also report each linear layer's
attention-output MSE against its softmax source before and after stage 1.

Stages (the shipped YAML recipes' settings, budgets from the command line):
- linearization: stage 1 attention transfer (new parameters only; skipped for Liger, which adds none), stage 2
  LoRA on q/k/v/o with next-token loss (plus self-distillation with ``--distill``);
- MoE partition / upcycling: stage 1 router-only warm-up, stage 2 routers + experts, both distilled from the dense
  source.

Training text defaults to WikiText-2's validation split (in domain for the perplexity, disjoint from its test split).
Writes ``recovery.json`` (every number, settings, timings) and ``recovery.png`` (perplexity vs training tokens) in
``--out``; each stage's checkpoints live under ``--out/<method>/``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import time
from pathlib import Path

import torch

from ..atomic_io import atomic_write_text

METHODS = {
    # name: (conversion target, conversion options)
    "liger": ("gla", {"method": "liger"}),
    "liger_keep": ("gla", {"method": "liger", "ratio": 3}),
    "lolcats": ("gla", {"method": "lolcats"}),
    "lolcats_keep": ("gla", {"method": "lolcats", "ratio": 3}),
    "lizard": ("gla", {"method": "lizard"}),
    "mamba_init": ("gated_deltanet", {"method": "mamba_init"}),
    "moe_partition": ("moe", {"method": "partition", "experts": 8, "top_k": 2, "split": "cluster"}),
    "moe_upcycle": ("moe", {"method": "upcycle", "experts": 4, "top_k": 2, "router_std": 0.02}),
}
TASK_FILES = ("piqa_valid.jsonl", "arc_easy_test.jsonl", "winogrande_dev.jsonl")


def _assets() -> Path:
    """``$HF_ARCH_ASSETS``, else ``../shared/assets`` seen from the working directory (as the recipes resolve it)."""
    from .schema import DEFAULT_ENV

    return Path(os.environ.get("HF_ARCH_ASSETS", DEFAULT_ENV["HF_ARCH_ASSETS"])).resolve()


def evaluate_model(model_dir: Path, ppl_tokens: int, eval_limit: int, assets: Path, batch_size: int = 8) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .evaluation import evaluate

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    started = time.time()
    results = evaluate(model, tokenizer, ppl_file=assets / "data" / "wikitext2_test.txt",
                       tasks=[assets / "data" / name for name in TASK_FILES], limit=eval_limit,
                       ppl_max_tokens=ppl_tokens, context_length=min(1024, model.config.max_position_embeddings),
                       batch_size=batch_size, show_progress=True)
    tasks = {name: round(r["acc_norm"], 4) for name, r in results["tasks"].items()}
    return {"ppl": round(results["perplexity"]["ppl"], 3), "tasks": tasks,
            "avg_acc": round(sum(tasks.values()) / max(len(tasks), 1), 4), "eval_seconds": round(time.time() - started)}


def attention_mse(model_dir: Path, assets: Path, tokens: int = 1024) -> list[float] | None:
    """Per linear layer MSE against the softmax source on the first tokens of the WikiText-2 test split."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..conversion.linearize import attention_mse_per_layer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    text = (assets / "data" / "wikitext2_test.txt").read_text(encoding="utf-8")[: tokens * 8]
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :tokens]
    return [round(v, 6) for v in attention_mse_per_layer(model, ids)]


def _stage_recipes(kind: str, source: str, args) -> list[tuple[str, dict]]:
    """``[(stage, recipe sections)]`` for a linearized (``linear``) or refactorized (``moe``) model."""
    base = {"per_device_train_batch_size": args.batch_size, "logging_steps": 10, "save_steps": 10**6,
            "save_total_limit": 1, "lr_scheduler_type": "cosine", "warmup_steps": 5}
    if kind == "moe":
        distill = {"teacher": source, "kl_weight": 1.0, "lm_weight": 1.0, "temperature": 2.0}
        return [
            ("stage1", {"training": {**base, "mode": "patterns", "trainable_patterns": [r"\.router\."],
                                     "max_steps": args.stage1_steps, "learning_rate": 1e-3}, "distill": distill}),
            ("stage2", {"training": {**base, "mode": "patterns", "max_steps": args.stage2_steps, "learning_rate": 2e-4,
                                     "trainable_patterns": [r"\.router\.", r"\.experts\.", r"\.shared_expert\."]},
                        "distill": distill}),
        ]
    stage2 = {"training": {**base, "mode": "lora", "max_steps": args.stage2_steps, "learning_rate": 1e-3},
              "lora": {"r": 8, "alpha": 16, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}}
    if args.distill:
        stage2["distill"] = {"teacher": "self", "kl_weight": 1.0, "lm_weight": 1.0, "temperature": 2.0}
    return [
        ("stage1", {"training": {**base, "mode": "new_params", "objective": "attention_transfer",
                                 "max_steps": args.stage1_steps, "learning_rate": 1e-2}}),
        ("stage2", stage2),
    ]


def run_method(name: str, source: str, out: Path, args, assets: Path) -> dict:
    from ..conversion import convert
    from ..peft_utils import new_parameter_names
    from .runner import run_recipe

    to, options = METHODS[name]
    work = out / name
    if work.exists():
        shutil.rmtree(work)
    started = time.time()
    converted = work / "converted"
    record = convert(source, converted, to=to, **options).record
    row = {"method": name, "target": to, "options": options, "max_abs_logit_diff": record["max_abs_logit_diff"],
           "points": [{"stage": "converted", "tokens": 0, **evaluate_model(converted, args.ppl_tokens,
                                                                           args.eval_limit, assets)}]}
    linear = to != "moe"
    if linear:
        row["attention_mse_before"] = attention_mse(converted, assets)
    train_file = Path(args.train_file) if args.train_file else assets / "data" / "wikitext2_valid.txt"
    current, tokens = converted, 0
    from transformers import AutoModelForCausalLM

    has_new = bool(new_parameter_names(AutoModelForCausalLM.from_pretrained(converted)))
    for stage, sections in _stage_recipes("linear" if linear else "moe", source, args):
        if stage == "stage1" and linear and not has_new:
            row["points"].append({**row["points"][-1], "stage": "stage1", "skipped": "no new parameters"})
            continue
        steps = sections["training"]["max_steps"]
        recipe = {"model": str(current), "output_dir": str(work / stage),
                  "data": {"train_file": str(train_file), "block_size": args.block_size}, **sections}
        summary = run_recipe(recipe)
        current = work / stage / "final"
        tokens += steps * args.batch_size * args.block_size
        point = {"stage": stage, "tokens": tokens, "train_seconds": summary["train_seconds"],
                 "loss_start": summary["loss_start"], "loss_end": summary["loss_end"],
                 **evaluate_model(current, args.ppl_tokens, args.eval_limit, assets)}
        row["points"].append(point)
        if linear and stage == "stage1":
            row["attention_mse_after_stage1"] = attention_mse(current, assets)
    row["seconds"] = round(time.time() - started)
    return row


def plot(rows: list[dict], source_eval: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for row in rows:
        ax.plot([p["tokens"] for p in row["points"]], [p["ppl"] for p in row["points"]], marker="o", label=row["method"])
    ax.axhline(source_eval["ppl"], color="black", linestyle="--", label="source")
    ax.set_xlabel("training tokens")
    ax.set_ylabel("WikiText-2 perplexity")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def format_table(result: dict) -> str:
    source = result["source_eval"]
    tasks = list(source["tasks"])
    lines = ["| method | stage | tokens | ppl | " + " | ".join(tasks) + " | avg acc | ppl / source | acc / source |",
             "|---|---|---|---|" + "---|" * len(tasks) + "---|---|---|"]
    lines.append(f"| source | - | - | {source['ppl']} | " + " | ".join(str(source["tasks"][t]) for t in tasks)
                 + f" | {source['avg_acc']} | 1.00 | 1.00 |")
    for row in result["methods"]:
        for p in row["points"]:
            lines.append(f"| {row['method']} | {p['stage']} | {p['tokens']} | {p['ppl']} | "
                         + " | ".join(str(p["tasks"].get(t)) for t in tasks)
                         + f" | {p['avg_acc']} | {p['ppl'] / source['ppl']:.2f} | "
                         f"{p['avg_acc'] / max(source['avg_acc'], 1e-9):.3f} |")
    return "\n".join(lines)


def _source_eval(args, assets: Path) -> dict:
    if not args.source_eval_from:
        return evaluate_model(Path(args.source), args.ppl_tokens, args.eval_limit, assets)
    earlier = json.loads(Path(args.source_eval_from).read_text())
    settings = earlier.get("settings", {})
    for key in ("ppl_tokens", "eval_limit"):
        if settings.get(key) != getattr(args, key):
            raise SystemExit(f"--source-eval-from {args.source_eval_from}: it was scored with {key}="
                             f"{settings.get(key)}, this run uses {getattr(args, key)}")
    if earlier.get("source") != args.source:
        raise SystemExit(f"--source-eval-from {args.source_eval_from} scored {earlier.get('source')}, not {args.source}")
    return earlier["source_eval"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="Llama-family checkpoint dir")
    parser.add_argument("--out", required=True)
    parser.add_argument("--methods", nargs="+", default=["liger", "liger_keep", "lolcats", "lolcats_keep",
                                                         "moe_partition"], choices=sorted(METHODS))
    parser.add_argument("--stage1-steps", type=int, default=100)
    parser.add_argument("--stage2-steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--block-size", type=int, default=512)
    parser.add_argument("--ppl-tokens", type=int, default=32768)
    parser.add_argument("--eval-limit", type=int, default=300)
    parser.add_argument("--train-file", default=None, help="default: WikiText-2 validation split from the assets")
    parser.add_argument("--distill", action="store_true", help="linearization stage 2: add self-distillation")
    parser.add_argument("--source-eval-from", default=None, metavar="RECOVERY_JSON",
                        help="reuse the source's scores from an earlier recovery.json of the same source and eval settings")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--json", action="store_true", help="print recovery.json instead of the table")
    args = parser.parse_args(argv)

    assets = _assets()
    out = Path(args.out)
    result_path = out / "recovery.json"
    if result_path.exists() and not args.overwrite:
        raise SystemExit(f"{result_path} exists; pass --overwrite to run again")
    out.mkdir(parents=True, exist_ok=True)
    result = {"source": args.source, "settings": {k: v for k, v in vars(args).items() if k not in ("json",)},
              "source_eval": _source_eval(args, assets), "methods": []}
    for name in args.methods:
        result["methods"].append(run_method(name, args.source, out, args, assets))
        # Written after every method, atomically, so a long run that stops keeps what it measured.
        atomic_write_text(result_path, json.dumps(result, indent=2) + "\n")
        plot(result["methods"], result["source_eval"], out / "recovery.png")
    print(json.dumps(result, indent=2) if args.json else format_table(result))
    return 0 if all(math.isfinite(p["ppl"]) for r in result["methods"] for p in r["points"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
