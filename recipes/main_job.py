"""The main job, end to end: convert a real checkpoint, evaluate, fine-tune, evaluate again, write the model card.

    python -m hf_arch.recipes.main_job --out outputs/main_job

Defaults use the shared stories260K checkpoint and TinyStories / WikiText-2 / PIQA / ARC-Easy / WinoGrande from
``$HF_ARCH_ASSETS`` (default ``../shared/assets``). Prints a JSON summary and writes it to ``OUT/summary.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

EVAL_FILE = "hf_arch_eval.json"


def assets_dir() -> Path:
    return Path(os.environ.get("HF_ARCH_ASSETS", "../shared/assets")).resolve()


def run_main_job(
    out: Path,
    *,
    source: Path | None = None,
    granularity: str = "elementwise",
    steps: int | None = None,
    eval_limit: int = 100,
    ppl_tokens: int = 8192,
    overwrite: bool = False,
) -> dict:
    from hf_arch.atomic_io import atomic_write_text
    from hf_arch.conversion import convert
    from hf_arch.model_cards.card import write_model_card
    from hf_arch.recipes import evaluation
    from hf_arch.recipes.runner import run_recipe

    assets = assets_dir()
    source = source or assets / "models/stories260K"
    if not source.exists():
        raise FileNotFoundError(f"Source checkpoint {source} not found; set HF_ARCH_ASSETS to the shared assets folder")
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass --overwrite to replace it")
    out.mkdir(parents=True, exist_ok=True)
    converted = out / "converted"
    conversion = convert(source, converted, granularity=granularity, overwrite=overwrite)

    data = assets / "data"
    eval_kwargs = dict(
        ppl_file=data / "wikitext2_test.txt",
        ppl_max_tokens=ppl_tokens,
        tasks=[data / "piqa_valid.jsonl", data / "arc_easy_test.jsonl", data / "winogrande_dev.jsonl"],
        limit=eval_limit,
    )

    def evaluate(path: Path) -> dict:
        model, tokenizer = evaluation.load_model_and_tokenizer(path)
        return evaluation.evaluate(model, tokenizer, **eval_kwargs)

    before = evaluate(converted)
    recipe = Path(__file__).parent / "configs" / "gated_attention_tinystories.yaml"
    overrides = [f"model={converted}", f"output_dir={out / 'finetuned'}", f"data.train_file={data / 'tinystories_2mib.txt'}"]
    if steps is not None:
        overrides.append(f"training.max_steps={steps}")
    training = run_recipe(recipe, overrides, overwrite=overwrite)
    final = Path(training["output_dir"]) / "final"
    after = evaluate(final)
    atomic_write_text(final / EVAL_FILE, json.dumps({"before": before, "after": after}, indent=2) + "\n")
    card = write_model_card(final, overwrite=True)

    summary = {
        "source": str(source),
        "converted": str(converted),
        "final_model": str(final),
        "model_card": str(card),
        "max_abs_logit_diff": conversion.max_abs_logit_diff,
        "training": training,
        "eval_before": before,
        "eval_after": after,
    }
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2, default=str) + "\n")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("outputs/main_job"))
    parser.add_argument("--source", type=Path, default=None, help="checkpoint to convert (default: stories260K)")
    parser.add_argument("--granularity", choices=["headwise", "elementwise"], default="elementwise")
    parser.add_argument("--steps", type=int, default=None, help="override the recipe's max_steps")
    parser.add_argument("--eval-limit", type=int, default=100, help="items per multiple-choice task")
    parser.add_argument("--ppl-tokens", type=int, default=8192)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    import hf_arch  # noqa: F401
    from hf_arch.recipes.evaluation import format_table

    summary = run_main_job(
        args.out,
        source=args.source,
        granularity=args.granularity,
        steps=args.steps,
        eval_limit=args.eval_limit,
        ppl_tokens=args.ppl_tokens,
        overwrite=args.overwrite,
    )
    print("== before fine-tuning ==\n" + format_table(summary["eval_before"]))
    print("== after fine-tuning ==\n" + format_table(summary["eval_after"]))
    print(json.dumps({k: summary[k] for k in ("max_abs_logit_diff", "final_model", "model_card")}, indent=2))
    t = summary["training"]
    print(f"training loss {t.get('loss_start')} -> {t.get('loss_end')} over {t.get('steps')} steps")
    return 0


if __name__ == "__main__":
    sys.exit(main())
