"""``hf-arch bench modes``: MoDES expert skipping's skip-rate vs perplexity curve on a pretrained MoE (ours or
transformers' Mixtral / Qwen2-MoE / Qwen3-MoE), against local gating alone (the same thresholding without the
layers' global importance).

    hf-arch bench modes MODEL --calibration-file CAL.txt --eval-file EVAL.txt --targets 0.2 0.4 0.6 0.8 --out DIR

For each target, the threshold is set on the calibration text (``hf_arch.expert_skipping.threshold_for_skip_rate``),
then the evaluation text's perplexity is measured with skipping on, and the skip rate realised there is reported
(calibration and evaluation texts differ, so it is near, not at, the target). One file for both: calibration takes
its last ``--calibration-tokens``, evaluation its first ``--eval-tokens``, never overlapping. Writes
``DIR/modes.json``, a Markdown table and ``modes.png``. Nothing here is trained.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from ..atomic_io import atomic_write_text

__all__ = ["calibration_batches", "format_modes_table", "main", "modes_curve"]


def calibration_batches(tokenizer, text_file, tokens: int, block_size: int, batch_size: int,
                        from_end: bool = False) -> list[dict]:
    """The first (``from_end``: last) ``tokens`` tokens of ``text_file`` as ``[batch_size, block_size]``
    ``input_ids`` batches."""
    text = Path(text_file).read_text(encoding="utf-8")
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    ids = ids[-tokens:] if from_end else ids[:tokens]
    blocks = len(ids) // block_size
    if blocks == 0:
        raise ValueError(f"{text_file}: {len(ids)} tokens, fewer than one block of {block_size}")
    rows = torch.tensor(ids[: blocks * block_size]).view(blocks, block_size)
    return [{"input_ids": rows[i:i + batch_size]} for i in range(0, blocks, batch_size)]


@torch.no_grad()
def modes_curve(model, tokenizer, *, calibration_file, eval_file, targets, calibration_tokens: int = 16384,
                eval_tokens: int = 32768, block_size: int = 256, batch_size: int = 4, progress: bool = True) -> dict:
    """``{"dense": {...}, "points": [{method, target, threshold, skip_rate, layer_skip_rates, ppl, nll}], ...}`` for
    methods ``modes`` (global modulation from calibration) and ``local`` (importance 1 everywhere)."""
    from hf_arch.expert_skipping import ExpertSkipping, layer_importance, threshold_for_skip_rate

    from .evaluation import perplexity

    model.eval()
    same_file = Path(calibration_file).resolve() == Path(eval_file).resolve()
    if same_file:  # calibrate on the file's end, evaluate on its start, and never on the same tokens
        total = len(tokenizer(Path(eval_file).read_text(encoding="utf-8"), add_special_tokens=False,
                              verbose=False)["input_ids"])
        if calibration_tokens + eval_tokens > total:
            raise ValueError(f"{eval_file}: {total} tokens, too few for {calibration_tokens} calibration tokens from "
                             f"its end and {eval_tokens} evaluation tokens from its start without overlap")
    batches = calibration_batches(tokenizer, calibration_file, calibration_tokens, block_size, batch_size,
                                  from_end=same_file)

    def ppl():
        return perplexity(model, tokenizer, eval_file, context_length=block_size, stride=block_size,
                          max_tokens=eval_tokens, batch_size=batch_size, show_progress=False)

    start = time.perf_counter()
    dense = ppl()
    importance = layer_importance(model, batches, progress=progress)
    points = []
    for method, alpha in (("modes", importance), ("local", None)):
        skipping = ExpertSkipping(model, importance=alpha)
        for target in targets:
            skipping.threshold = threshold_for_skip_rate(skipping, model, batches, target)
            skipping.reset_counts()
            with skipping:
                result = ppl()
            points.append({"method": method, "target": target, "threshold": skipping.threshold,
                           "skip_rate": skipping.skip_rate(), "layer_skip_rates": skipping.layer_skip_rates(),
                           "ppl": result["ppl"], "nll": result["nll"]})
    return {"dense": {"ppl": dense["ppl"], "nll": dense["nll"], "tokens": dense["tokens"]},
            "importance": importance, "points": points, "moe_layers": len(importance),
            "settings": {"calibration_file": str(calibration_file), "eval_file": str(eval_file),
                         "calibration_tokens": calibration_tokens, "eval_tokens": eval_tokens,
                         "block_size": block_size, "targets": list(targets)},
            "seconds": time.perf_counter() - start}


def format_modes_table(result: dict) -> str:
    dense = result["dense"]["ppl"]
    lines = [f"dense perplexity {dense:.3f} ({result['dense']['tokens']:,} tokens); layer importance α: "
             + ", ".join(f"{a:.2f}" for a in result["importance"]), "",
             "| method | target skip | realised skip | perplexity | × dense |", "|---|---|---|---|---|"]
    for p in result["points"]:
        lines.append(f"| {p['method']} | {p['target']:.2f} | {p['skip_rate']:.3f} | {p['ppl']:.3f} | "
                     f"{p['ppl'] / dense:.3f} |")
    return "\n".join(lines)


def plot_modes(result: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for method, label in (("modes", "MoDES (α · π)"), ("local", "local gating (π)")):
        pts = [p for p in result["points"] if p["method"] == method]
        ax.plot([0] + [p["skip_rate"] for p in pts], [result["dense"]["ppl"]] + [p["ppl"] for p in pts],
                marker="o", label=label)
    ax.set_xlabel("share of expert assignments skipped (evaluation text)")
    ax.set_ylabel("perplexity")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-arch bench modes", description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="an MoE checkpoint dir; with --train-tiny-qwen3-moe, where to write one")
    parser.add_argument("--train-tiny-qwen3-moe", action="store_true",
                        help="first train a small transformers Qwen3-MoE on TinyStories into MODEL "
                             "(recipes/tiny_moe_subject.py); its train / held-out text become the calibration / "
                             "evaluation files unless given")
    parser.add_argument("--train-steps", type=int, default=400)
    parser.add_argument("--calibration-file")
    parser.add_argument("--eval-file")
    parser.add_argument("--targets", type=float, nargs="+", default=[0.2, 0.4, 0.6, 0.8])
    parser.add_argument("--calibration-tokens", type=int, default=16384)
    parser.add_argument("--eval-tokens", type=int, default=32768)
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--out", help="directory for modes.json / modes.md / modes.png")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--json", action="store_true")
    return parser


def main(argv=None) -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import hf_arch  # noqa: F401  (registers our model types)

    args = build_parser().parse_args(argv)
    bad = [t for t in args.targets if not 0.0 < t < 1.0]
    if bad:
        raise SystemExit(f"hf-arch bench modes: --targets must be in (0, 1), got {bad}")
    out = Path(args.out) if args.out else None
    if out is not None and (out / "modes.json").exists() and not args.overwrite:
        raise SystemExit(f"hf-arch bench modes: {out / 'modes.json'} exists; pass --overwrite to replace it")
    if args.train_tiny_qwen3_moe:
        from .tiny_moe_subject import train_tiny_qwen3_moe

        if Path(args.model, "config.json").exists() and not args.overwrite:
            raise SystemExit(f"hf-arch bench modes: {args.model} already holds a model; pass --overwrite")
        subject = train_tiny_qwen3_moe(Path(args.model), steps=args.train_steps)
        args.calibration_file = args.calibration_file or str(subject / "train.txt")
        args.eval_file = args.eval_file or str(subject / "heldout.txt")
    if not (args.calibration_file and args.eval_file):
        raise SystemExit("hf-arch bench modes: give --calibration-file and --eval-file (or --train-tiny-qwen3-moe)")
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    result = modes_curve(model, tokenizer, calibration_file=args.calibration_file, eval_file=args.eval_file,
                         targets=args.targets, calibration_tokens=args.calibration_tokens,
                         eval_tokens=args.eval_tokens, block_size=args.block_size, batch_size=args.batch_size)
    result["model"] = {"path": str(args.model), "model_type": model.config.model_type,
                       "architecture": type(model).__name__}
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "modes.json", json.dumps(result, indent=1))
        atomic_write_text(out / "modes.md", format_modes_table(result) + "\n")
        plot_modes(result, out / "modes.png", f"MoDES on {Path(args.model).name} ({model.config.model_type})")
    print(json.dumps(result, indent=1) if args.json else format_modes_table(result))
    return 0 if all(math.isfinite(p["ppl"]) for p in result["points"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
