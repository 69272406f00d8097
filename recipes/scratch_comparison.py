"""From-scratch comparison: every architecture variant against a Llama baseline of equal parameter count.

    hf-arch bench scratch --out outputs/scratch [--variants llama gated_attention move] [--steps 600] [--json]
    python -m hf_arch.recipes.scratch_comparison --out outputs/scratch --variants llama --steps 30   # timing probe

Data: TinyStories (``data/tinystories_2mib.txt`` in the shared assets) tokenised with the stories260K tokenizer
(vocab 512), each story prefixed with BOS. Stories are split, not blocks: the last ``--val-fraction`` of the
stories are validation. Each side is packed into blocks of ``--block-size`` tokens. The training stream is a fixed
sequence of ``--steps`` x ``--batch-size`` blocks: seeded permutations of the training blocks, one after the other.
Every model sees exactly the same batches in the same order, and the same first ``--val-blocks`` validation blocks.

Models: the baseline ``llama`` is transformers' own ``LlamaForCausalLM``. Each hf-arch variant in :data:`VARIANTS`
shares its dimensions, but gets its own ``intermediate_size``: the one whose trainable parameter count is closest
to the baseline's. The search builds the models on the meta device. A variant more than 2 % away is refused.

Training (identical for every model, fp32): transformers' ``Trainer``, AdamW, ``--lr`` with a linear warmup over
``--warmup-fraction`` of the steps then cosine decay, weight decay 0.1, gradient clipping 1.0. The seed is set
before each model's initialisation. Validation loss (mean token-level cross-entropy) is measured at step 0, every
``--eval-every`` steps and at the end. Throughput is training tokens (``batch x block`` per step, every input
token counted) per wall-clock second of training. Evaluation time is not counted. A model whose next step would
overrun ``--time-budget-min`` (wall clock, evaluation included) is stopped there and marked as cut.

Writes ``scratch_comparison.json`` (after every model, so a stopped run keeps what it finished),
``scratch_comparison.md`` (the table) and ``scratch_comparison.png`` (validation loss vs training tokens, train
loss faint) in ``--out``. No checkpoints are saved.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..atomic_io import atomic_write_text
from .recovery_benchmark import _assets

BASELINE = "llama"
# name -> (hf-arch model_type, config kwargs beyond the shared dimensions)
VARIANTS: dict[str, tuple[str, dict]] = {
    "gated_attention": ("hfa_gated_attention", {"attn_output_gate": "elementwise"}),
    "sa_softmax": ("hfa_sa_softmax", {"attn_score_function": "sa_softmax_normalized"}),
    "affine_attention": ("hfa_affine_attention", {}),
    "diff_attention": ("hfa_diff_attention", {"diff_attn_noise_heads": 2}),
    # DIFF's per-head RMSNorm off: the plain difference of the two maps (trains far faster at this scale).
    "diff_attention_no_norm": ("hfa_diff_attention", {"diff_attn_noise_heads": 2, "diff_attn_head_norm": False}),
    "move": ("hfa_move", {"move_num_slots": 64}),
    "cubit": ("hfa_cubit", {}),
    "sas": ("hfa_sas", {}),
    "geonorm": ("hfa_geonorm", {}),
    # every projection parameter tokens; the FFN's token count is the matched intermediate_size
    "tokenformer": ("hfa_tokenformer", {}),
}
# The hybrid study's question (recall with the linear : full ratio; opt in with --variants): Gated DeltaNet layers with
# one softmax attention layer after every `ratio` linear ones (use enough layers for 6 : 1), and none at all.
RATIO_VARIANTS: dict[str, tuple[str, dict]] = {
    "gdn_hybrid_1to1": ("hfa_gated_deltanet", {"linear_to_full_ratio": 1}),
    "gdn_hybrid_3to1": ("hfa_gated_deltanet", {"linear_to_full_ratio": 3}),
    "gdn_hybrid_6to1": ("hfa_gated_deltanet", {"linear_to_full_ratio": 6}),
    "gdn_linear": ("hfa_gated_deltanet", {}),
}
MODELS = {**VARIANTS, **RATIO_VARIANTS}
PARAM_TOLERANCE = 0.02  # largest accepted |params - baseline| / baseline
STORIES_FILE = "data/tinystories_2mib.txt"
TOKENIZER_DIR = "models/stories260K"
STORY_SEPARATOR = "<|endoftext|>"
OUTPUT_NAMES = ("scratch_comparison.json", "scratch_comparison.md", "scratch_comparison.png")
# Arguments that do not change what a model's numbers mean: --resume may differ in them.
NOT_COMPARED = ("out", "overwrite", "resume", "json", "variants")


class ScratchComparisonError(ValueError):
    """A setting the comparison cannot honour (unknown model type, unmatched parameter count, stale results)."""


@dataclass(frozen=True)
class ModelSpec:
    name: str
    model_type: str  # "llama" for the baseline
    config_kwargs: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------------- models


def model_spec(name: str, table: dict[str, tuple[str, dict]] | None = None) -> ModelSpec:
    """The baseline or a table entry; refuses a model type that transformers does not know (yet)."""
    if name == BASELINE:
        return ModelSpec(BASELINE, "llama")
    table = MODELS if table is None else table
    if name not in table:
        raise ScratchComparisonError(f"unknown model {name!r}; choose from {BASELINE}, {', '.join(table)}")
    model_type, kwargs = table[name]
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    import hf_arch  # noqa: F401  (registers the hf-arch model types)

    if model_type not in CONFIG_MAPPING:
        known = sorted(t for t in CONFIG_MAPPING if t.startswith("hfa_"))
        raise ScratchComparisonError(
            f"variant {name!r}: model type {model_type!r} is not registered with transformers (registered hf-arch "
            f"types: {', '.join(known)}). Its module must be registered in hf_arch/models/__init__.py; until then "
            f"leave it out with --variants.")
    return ModelSpec(name, model_type, dict(kwargs))


def shared_dims(args, vocab_size: int) -> dict:
    """The dimensions every model shares (the baseline's ``intermediate_size`` is not among them)."""
    return {"vocab_size": vocab_size, "hidden_size": args.hidden_size, "num_hidden_layers": args.num_layers,
            "num_attention_heads": args.num_heads, "num_key_value_heads": args.num_kv_heads,
            "max_position_embeddings": args.block_size, "tie_word_embeddings": False, "use_cache": False}


def build_config(spec: ModelSpec, shared: dict, intermediate_size: int):
    from transformers import AutoConfig, LlamaConfig

    if spec.model_type == "llama":
        return LlamaConfig(**shared, intermediate_size=intermediate_size)
    return AutoConfig.for_model(spec.model_type, **shared, **spec.config_kwargs, intermediate_size=intermediate_size)


def build_model(config):
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    if config.model_type == "llama":
        return LlamaForCausalLM(config)
    return AutoModelForCausalLM.from_config(config)


def count_trainable_parameters(config) -> int:
    """Trainable parameters of the model ``config`` builds; on the meta device, so nothing is allocated."""
    with torch.device("meta"):
        model = build_model(config)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def match_intermediate_size(count_at: Callable[[int], int], target: int, start: int, max_growth: int = 64) -> int:
    """The intermediate size whose count is closest to ``target`` (ties: the smaller size).

    ``count_at`` must not decrease with the size. Doubles from ``start`` until the count reaches the target, then
    bisects; if even ``start * max_growth`` stays below, that size is returned (the tolerance check then refuses).
    """
    seen: dict[int, int] = {}

    def count(size: int) -> int:
        if size not in seen:
            seen[size] = count_at(size)
        return seen[size]

    high = max(1, start)
    while count(high) < target and high < start * max_growth:
        high *= 2
    if count(high) < target:
        return high
    if count(1) >= target:
        return 1
    low = 1  # invariant: count(low) < target <= count(high)
    while high - low > 1:
        middle = (low + high) // 2
        if count(middle) < target:
            low = middle
        else:
            high = middle
    return min((low, high), key=lambda size: (abs(count(size) - target), size))


def relative_difference(params: int, baseline: int) -> float:
    return (params - baseline) / baseline


def matched_config(spec: ModelSpec, shared: dict, baseline_params: int, baseline_intermediate: int,
                   tolerance: float = PARAM_TOLERANCE):
    """``(config, params)`` for the spec, its ``intermediate_size`` matched to the baseline's parameter count."""
    if spec.model_type == "llama":
        config = build_config(spec, shared, baseline_intermediate)
        return config, count_trainable_parameters(config)
    size = match_intermediate_size(
        lambda i: count_trainable_parameters(build_config(spec, shared, i)), baseline_params, baseline_intermediate)
    config = build_config(spec, shared, size)
    params = count_trainable_parameters(config)
    difference = relative_difference(params, baseline_params)
    if abs(difference) > tolerance:
        raise ScratchComparisonError(
            f"variant {spec.name!r}: the closest intermediate_size ({size}) gives {params:,} trainable parameters, "
            f"{difference:+.2%} from the baseline's {baseline_params:,} (tolerance {tolerance:.0%}); its extra "
            "parameters do not scale with intermediate_size enough to compensate at these dimensions")
    return config, params


# ------------------------------------------------------------------------------------------------------------ data


@dataclass
class TokenData:
    train_blocks: torch.Tensor  # [N, block] int64
    val_blocks: torch.Tensor  # [M, block] int64
    train_stories: int
    val_stories: int


def load_token_data(assets: Path, tokenizer, block_size: int, val_fraction: float) -> TokenData:
    """TinyStories split by story (the last ``val_fraction`` for validation), each side packed into blocks."""
    from .data import load_documents, tokenize_and_pack
    from .schema import DataConfig

    cfg = DataConfig(train_file=str(assets / STORIES_FILE), document_separator=STORY_SEPARATOR,
                     drop_last_document=True, block_size=block_size, add_bos=True, add_eos=False, packing=True)
    stories = load_documents(cfg.train_file, cfg)  # the file's last story is cut mid-sentence: dropped
    val_count = max(1, round(len(stories) * val_fraction))
    train_docs = stories.select(range(len(stories) - val_count))
    val_docs = stories.select(range(len(stories) - val_count, len(stories)))
    return TokenData(_blocks(tokenize_and_pack(train_docs, tokenizer, cfg, "train stories")),
                     _blocks(tokenize_and_pack(val_docs, tokenizer, cfg, "validation stories")),
                     len(train_docs), len(val_docs))


def mix_recall_blocks(stream: torch.Tensor, tokenizer, fraction: float, seed: int, pairs: int | None = None,
                      answers_only: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``stream`` with a seeded ``fraction`` of its blocks replaced by MQAR sequences of the same length (from the
    tokenizer's word tokens, as the recall probe builds them, from a generator of their own), and the labels: the
    stories' own tokens; in an MQAR block only the queried values with ``answers_only`` (Zoology's loss: the random
    keys, values and distractors are noise the model cannot predict, and their loss drowns the answers' — with it,
    nothing learns recall at this scale), else every token."""
    import random

    from .recall_probe import mqar_sequence, word_tokens

    if not 0.0 < fraction <= 1.0:
        raise ScratchComparisonError(f"--recall-train-fraction must be in (0, 1], got {fraction!r}")
    if pairs is not None and not 1 <= pairs <= stream.shape[1] // 4:
        raise ScratchComparisonError(f"--recall-pairs must be in [1, block size // 4 = {stream.shape[1] // 4}], "
                                     f"got {pairs!r}")
    stream, labels = stream.clone(), stream.clone()
    generator = torch.Generator().manual_seed(seed + 7919)
    rows = torch.randperm(len(stream), generator=generator)[: round(fraction * len(stream))]
    rng = random.Random(seed + 7919)
    candidates = word_tokens(tokenizer)
    for row in rows.tolist():
        sequence, queries = mqar_sequence(candidates, stream.shape[1], rng, pairs)
        stream[row] = torch.tensor(sequence, dtype=stream.dtype)
        if answers_only:
            labels[row] = -100
            for position, value in queries:  # the value follows its repeated key
                labels[row, position + 1] = value
        else:
            labels[row] = stream[row]
    return stream, labels


def _blocks(packed) -> torch.Tensor:
    return torch.tensor(packed["input_ids"], dtype=torch.long)


def training_order(num_blocks: int, samples: int, seed: int) -> torch.Tensor:
    """Indices of ``samples`` training blocks: seeded permutations back to back (an epoch each)."""
    generator = torch.Generator().manual_seed(seed)
    epochs = math.ceil(samples / num_blocks)
    return torch.cat([torch.randperm(num_blocks, generator=generator) for _ in range(epochs)])[:samples]


class BlockStream(torch.utils.data.Dataset):
    """The fixed training stream; read in order (the Trainer's sampler is sequential), so batches never differ."""

    def __init__(self, blocks: torch.Tensor, labels: torch.Tensor | None = None):
        self.blocks = blocks
        self.labels = blocks if labels is None else labels

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, index: int) -> dict:
        return {"input_ids": self.blocks[index], "labels": self.labels[index]}


def fingerprint(blocks: torch.Tensor) -> str:
    return hashlib.sha256(blocks.numpy().tobytes()).hexdigest()


# ------------------------------------------------------------------------------------------------------ training


@torch.no_grad()
def validation_loss(model, blocks: torch.Tensor, batch_size: int) -> float:
    """Mean next-token cross-entropy over every predicted token of the blocks (from the logits: no auxiliary loss
    a variant may add to ``out.loss`` is counted)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, tokens = 0.0, 0
    for batch in blocks.split(batch_size):
        batch = batch.to(device)
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
        total += torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(),
                                                   reduction="sum").item()
        tokens += batch[:, 1:].numel()
    model.train(was_training)
    return total / tokens


def _callback_classes():
    """The Trainer callbacks, defined on first use so that importing this module does not import transformers."""
    from tqdm.auto import tqdm
    from transformers import ProgressCallback, TrainerCallback

    class QuietProgress(ProgressCallback):
        """The Trainer's progress bar, with the last train loss as its postfix instead of a printed line per log."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            if self.training_bar is not None and logs and "loss" in logs:
                self.training_bar.set_postfix(loss=f"{logs['loss']:.3f}", refresh=False)

    class CurveRecorder(TrainerCallback):
        """Train loss at every log; validation loss at step 0 and every ``eval_every`` steps; training seconds
        without evaluation; stops before a step that would overrun the time budget."""

        def __init__(self, evaluate: Callable, eval_every: int, tokens_per_step: int, budget_seconds: float,
                     label: str):
            self.evaluate, self.eval_every, self.tokens_per_step = evaluate, eval_every, tokens_per_step
            self.budget_seconds, self.label = budget_seconds, label
            self.train_curve: list[dict] = []
            self.val_curve: list[dict] = []
            self.train_seconds = self.eval_seconds = 0.0
            self.cut: str | None = None

        def validate(self, model, step: int) -> None:
            started = time.perf_counter()
            loss = self.evaluate(model)
            self.eval_seconds += time.perf_counter() - started
            # Cumulative training seconds too: a slowdown mid-run (a busy machine) shows in the curve, not just the mean.
            self.val_curve.append({"step": step, "tokens": step * self.tokens_per_step, "loss": round(loss, 5),
                                   "train_seconds": round(self.train_seconds, 2)})
            tqdm.write(f"{self.label} step {step}: validation loss {loss:.4f}", file=sys.stderr)

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self.validate(model, 0)
            self.wall_start = self.mark = time.perf_counter()

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.synchronize()  # CUDA runs ahead of Python: time the work, not its launch
            self.train_seconds += time.perf_counter() - self.mark
            step = state.global_step
            if step % self.eval_every == 0:
                self.validate(model, step)
            elapsed = time.perf_counter() - self.wall_start
            if step < state.max_steps and elapsed + self.train_seconds / step > self.budget_seconds:
                control.should_training_stop = True
                self.cut = (f"time budget: {elapsed:.0f} s after {step} steps, the next would overrun "
                            f"{self.budget_seconds:.0f} s")
            self.mark = time.perf_counter()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                step = state.global_step
                self.train_curve.append({"step": step, "tokens": step * self.tokens_per_step,
                                         "loss": round(float(logs["loss"]), 5)})

    return QuietProgress, CurveRecorder


def training_arguments(args, output_dir: str, warmup_steps: int):
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=output_dir, max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr, weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm, optim="adamw_torch",
        lr_scheduler_type="cosine", warmup_steps=warmup_steps, logging_strategy="steps",
        logging_steps=args.log_every, save_strategy="no", eval_strategy="no", report_to=[], seed=args.seed,
        data_seed=args.seed, bf16=False, fp16=False, train_sampling_strategy="sequential",
        dataloader_num_workers=0, dataloader_pin_memory=torch.cuda.is_available(), disable_tqdm=False)


def train_model(spec: ModelSpec, config, args, stream: torch.Tensor, val_blocks: torch.Tensor,
                tokenizer=None, labels: torch.Tensor | None = None) -> dict:
    """Train one model from scratch on the fixed stream; its steps, throughput and loss curves."""
    from transformers import ProgressCallback, Trainer, default_data_collator, set_seed

    quiet_progress, curve_recorder = _callback_classes()
    set_seed(args.seed)  # the same seed before every model's initialisation
    model = build_model(config)
    tokens_per_step = args.batch_size * args.block_size
    recorder = curve_recorder(lambda m: validation_loss(m, val_blocks, args.batch_size), args.eval_every,
                              tokens_per_step, args.time_budget_min * 60, spec.name)
    warmup_steps = round(args.steps * args.warmup_fraction)
    with tempfile.TemporaryDirectory(prefix="hfa-scratch-") as output_dir:  # the Trainer wants one; nothing kept
        trainer = Trainer(model=model, args=training_arguments(args, output_dir, warmup_steps),
                          train_dataset=BlockStream(stream, labels), data_collator=default_data_collator,
                          callbacks=[recorder])
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(quiet_progress())
        trainer.train()
    steps = trainer.state.global_step
    if recorder.val_curve[-1]["step"] != steps:
        recorder.validate(model, steps)
    final = recorder.val_curve[-1]["loss"]
    recall = {}
    if getattr(args, "recall", False):
        from .recall_probe import RecallSettings, recall_probe

        model.eval()
        recall = {"recall": recall_probe(model, tokenizer, RecallSettings(
            lengths=tuple(args.recall_lengths), samples=args.recall_samples, batch_size=args.batch_size,
            seed=args.seed, pairs=getattr(args, "recall_pairs", None)), progress=False)}
    return {**recall, "architecture": type(model).__name__, "attn_implementation": model.config._attn_implementation,
            "device": str(next(model.parameters()).device), "warmup_steps": warmup_steps, "steps_planned": args.steps,
            "steps_done": steps, "cut": recorder.cut, "train_tokens": steps * tokens_per_step,
            "train_seconds": round(recorder.train_seconds, 2), "eval_seconds": round(recorder.eval_seconds, 2),
            "tokens_per_second": round(steps * tokens_per_step / recorder.train_seconds, 1),
            "seconds_per_step": round(recorder.train_seconds / steps, 4), "final_val_loss": final,
            "final_val_ppl": round(math.exp(final), 4), "best_val_loss": min(p["loss"] for p in recorder.val_curve),
            "curves": {"val": recorder.val_curve, "train": recorder.train_curve}}


# ------------------------------------------------------------------------------------------------------- outputs


def plot_curves(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Left: the whole run; right: the second half zoomed in, where the models separate.
    fig, (full, late) = plt.subplots(1, 2, figsize=(13, 5))
    late_losses = []
    for index, row in enumerate(result["models"]):
        color = f"C{index % 10}" if index < 10 else "black"
        train, val = row["curves"]["train"], row["curves"]["val"]
        label = row["name"] + (" (cut)" if row["cut"] else "")
        for ax in (full, late):
            if train:
                ax.plot([p["tokens"] for p in train], [p["loss"] for p in train], color=color, alpha=0.25,
                        linewidth=0.8)
            ax.plot([p["tokens"] for p in val], [p["loss"] for p in val], color=color, marker="o", markersize=3,
                    label=label, linestyle="-" if index < 10 else "--")
        halfway = row["train_tokens"] / 2
        late_losses += [p["loss"] for p in val if p["tokens"] >= halfway]
    if late_losses:
        ordered = sorted(late_losses)
        top = ordered[int(0.9 * (len(ordered) - 1))]  # leave far-off outliers out of the zoom
        late.set_ylim(ordered[0] - 0.05, top + 0.1)
        late.set_xlim(max(row["train_tokens"] for row in result["models"]) / 2, None)
    for ax in (full, late):
        ax.set_xlabel("training tokens")
        ax.grid(alpha=0.3)
    full.set_ylabel("loss (validation: markers; train: faint)")
    full.set_title(f"from scratch on TinyStories, ~{result['baseline_params'] / 1e6:.2f} M parameters each")
    late.set_title("second half, zoomed")
    late.legend(fontsize=8)
    fig.tight_layout()
    partial = path.with_name(path.name + ".partial")
    fig.savefig(partial, format="png")
    plt.close(fig)
    partial.replace(path)


def format_table(result: dict) -> str:
    recall = [(probe, length) for probe in ("mqar", "passkey")
              for length in (result["models"][0].get("recall", {}).get(probe, {}) if result["models"] else {})]
    extra = "".join(f" {probe} {length} |" for probe, length in recall)
    lines = ["| model | params | Δparams | steps | tokens/s | val loss | val ppl |" + extra,
             "|---|---|---|---|---|---|---|" + "---|" * len(recall)]
    for row in result["models"]:
        steps = str(row["steps_done"]) if not row["cut"] else f"{row['steps_done']}/{row['steps_planned']} (cut)"
        scores = "".join(
            f" {row['recall'][probe][length]['accuracy']:.3f} ± {row['recall'][probe][length]['stderr']:.3f} |"
            if probe in row.get("recall", {}) and length in row["recall"][probe] else " - |" for probe, length in recall)
        lines.append(f"| {row['name']} | {row['params']:,} | {row['params_rel_diff']:+.2%} | {steps} | "
                     f"{row['tokens_per_second']:,.0f} | {row['final_val_loss']:.4f} | {row['final_val_ppl']:.3f} |"
                     + scores)
    data = result["data"]
    lines += ["", (f"{data['tokens_per_step']:,} training tokens per step; tokens/s counts training time only "
                   f"(validation excluded); validation: {data['val_blocks_used']} blocks of "
                   f"{result['settings']['block_size']} tokens from {data['val_stories']} held-out stories; device "
                   f"{result['environment']['device']}.")]
    cut = [row["name"] for row in result["models"] if row["cut"]]
    if cut:
        lines.append(f"Cut by the time budget (--time-budget-min): {', '.join(cut)}.")
    return "\n".join(lines)


def write_outputs(result: dict, out: Path) -> None:
    json_name, md_name, png_name = OUTPUT_NAMES
    atomic_write_text(out / json_name, json.dumps(result, indent=2) + "\n")
    atomic_write_text(out / md_name, format_table(result) + "\n")
    plot_curves(result, out / png_name)


# ---------------------------------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-arch bench scratch", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--variants", nargs="+", default=[BASELINE, *VARIANTS], choices=[BASELINE, *MODELS],
                        metavar="NAME", help=f"models to train, in order (default: {BASELINE} and every variant): "
                                             f"{BASELINE}, {', '.join(VARIANTS)}; hybrid ratios: "
                                             f"{', '.join(RATIO_VARIANTS)}")
    parser.add_argument("--hidden-size", type=int, default=128)
    parser.add_argument("--num-layers", type=int, default=4)
    parser.add_argument("--num-heads", type=int, default=4)
    parser.add_argument("--num-kv-heads", type=int, default=2)
    parser.add_argument("--intermediate-size", type=int, default=384, help="the baseline's; variants are matched")
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--warmup-fraction", type=float, default=0.05)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--log-every", type=int, default=10, help="train-loss points (mean over the interval)")
    parser.add_argument("--val-blocks", type=int, default=64, help="cap on validation blocks (0: all)")
    parser.add_argument("--val-fraction", type=float, default=0.05, help="share of stories held out, from the end")
    parser.add_argument("--time-budget-min", type=float, default=30.0, help="per model, wall clock")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--overwrite", action="store_true", help="discard the results in --out and start again")
    mode.add_argument("--resume", action="store_true",
                      help="keep the models already in --out's JSON (same settings required); train the others")
    parser.add_argument("--recall", action="store_true",
                        help="after training, the recall probes (MQAR and passkey, recipes/recall_probe.py) beside the "
                             "loss: the hybrid-ratio question")
    parser.add_argument("--recall-train-fraction", type=float, default=0.0,
                        help="share of training blocks replaced by synthetic MQAR sequences (seeded, the same for "
                             "every model); 1: MQAR alone, Zoology's setting (the validation loss is then off-task). "
                             "TinyStories alone teaches no recall at this scale, and mixed in, the few answer tokens "
                             "weigh little in the token-averaged loss")
    parser.add_argument("--recall-pairs", type=int, default=None,
                        help="MQAR key-value pairs per sequence, in training and in the probe (default: length // 4, "
                             "the hardest; small models learn recall on CPU with a few, e.g. 4)")
    parser.add_argument("--recall-loss", choices=("answers", "all"), default="answers",
                        help="loss on the MQAR training blocks: the queried values only (Zoology's; default) or "
                             "every token")
    parser.add_argument("--recall-lengths", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--recall-samples", type=int, default=8)
    parser.add_argument("--json", action="store_true", help="print the JSON instead of the table")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except ScratchComparisonError as error:
        raise SystemExit(f"hf-arch bench scratch: error: {error}") from error


def run(args) -> int:
    if min(args.steps, args.batch_size, args.block_size, args.eval_every, args.log_every) < 1:
        raise ScratchComparisonError("--steps, --batch-size, --block-size, --eval-every and --log-every must be >= 1")
    if args.recall and max(args.recall_lengths) > args.block_size:
        raise ScratchComparisonError(f"--recall-lengths {max(args.recall_lengths)} exceeds --block-size "
                                     f"{args.block_size}, the models' max_position_embeddings: probe at most the "
                                     "trained length")
    if args.recall_pairs is not None and args.recall and args.recall_pairs > min(args.recall_lengths) // 4:
        raise ScratchComparisonError(f"--recall-pairs {args.recall_pairs} does not fit the shortest recall length "
                                     f"{min(args.recall_lengths)} (at most length // 4 = "
                                     f"{min(args.recall_lengths) // 4})")
    specs = [model_spec(name) for name in dict.fromkeys(args.variants)]  # before any work: unregistered types
    out = Path(args.out)
    existing = [name for name in OUTPUT_NAMES if (out / name).exists()]
    if existing and not (args.overwrite or args.resume):
        raise ScratchComparisonError(f"{out} already holds {', '.join(existing)}; pass --overwrite to start again "
                                     "or --resume to add the missing models")
    from transformers import AutoTokenizer

    assets = _assets()
    for relative in (STORIES_FILE, TOKENIZER_DIR):
        if not (assets / relative).exists():
            raise ScratchComparisonError(f"asset {assets / relative} is missing (set HF_ARCH_ASSETS)")
    tokenizer = AutoTokenizer.from_pretrained(assets / TOKENIZER_DIR)
    tokenizer.model_max_length = 10**9  # stories are tokenised whole, then packed: no length warning
    data = load_token_data(assets, tokenizer, args.block_size, args.val_fraction)
    stream = data.train_blocks[training_order(len(data.train_blocks), args.steps * args.batch_size, args.seed)]
    labels = None
    if args.recall_train_fraction:
        stream, labels = mix_recall_blocks(stream, tokenizer, args.recall_train_fraction, args.seed,
                                           args.recall_pairs, answers_only=args.recall_loss == "answers")
    val_blocks = data.val_blocks[: args.val_blocks] if args.val_blocks > 0 else data.val_blocks

    shared = shared_dims(args, len(tokenizer))
    _, baseline_params = matched_config(model_spec(BASELINE), shared, 0, args.intermediate_size)
    configs = {spec.name: matched_config(spec, shared, baseline_params, args.intermediate_size) for spec in specs}

    result = new_result(args, shared, baseline_params, data, stream, val_blocks, labels)
    if args.resume:
        result["models"] = resumable_models(out, result)
    out.mkdir(parents=True, exist_ok=True)
    done = {row["name"] for row in result["models"]}
    for index, spec in enumerate(specs, 1):
        config, params = configs[spec.name]
        if spec.name in done:
            print(f"[{index}/{len(specs)}] {spec.name}: already in the results, skipped (--resume)", file=sys.stderr)
            continue
        print(f"[{index}/{len(specs)}] {spec.name} ({spec.model_type}): intermediate_size {config.intermediate_size}, "
              f"{params:,} parameters ({relative_difference(params, baseline_params):+.2%} vs {BASELINE})",
              file=sys.stderr, flush=True)
        row = {"name": spec.name, "model_type": spec.model_type, "config_kwargs": spec.config_kwargs,
               "intermediate_size": config.intermediate_size, "params": params, "baseline_params": baseline_params,
               "params_rel_diff": round(relative_difference(params, baseline_params), 6),
               "rope_parameters": getattr(config, "rope_parameters", None),
               **train_model(spec, config, args, stream, val_blocks, tokenizer, labels)}
        result["models"].append(row)
        write_outputs(result, out)  # after every model, atomically: a run that stops keeps what it finished
    write_outputs(result, out)
    print(json.dumps(result, indent=2) if args.json else format_table(result))
    return 0 if all(math.isfinite(row["final_val_loss"]) for row in result["models"]) else 1


def new_result(args, shared: dict, baseline_params: int, data: TokenData, stream: torch.Tensor,
               val_blocks: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
    import transformers

    device = "cuda" if torch.cuda.is_available() else "cpu"
    return {
        "settings": {key: value for key, value in vars(args).items() if key not in NOT_COMPARED},
        "shared_config": shared,
        "baseline_params": baseline_params,
        "data": {"file": STORIES_FILE, "tokenizer": TOKENIZER_DIR, "train_stories": data.train_stories,
                 "val_stories": data.val_stories, "train_blocks": len(data.train_blocks),
                 "val_blocks": len(data.val_blocks), "val_blocks_used": len(val_blocks),
                 "tokens_per_step": args.batch_size * args.block_size,
                 "train_stream_sha256": fingerprint(stream), "val_sha256": fingerprint(val_blocks),
                 **({"train_labels_sha256": fingerprint(labels)} if labels is not None else {})},
        "environment": {"device": device, "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                        "transformers": transformers.__version__},
        "models": [],
    }


def resumable_models(out: Path, result: dict) -> list[dict]:
    """The models of an earlier run in ``out``, if it used the same settings and data; else a clear refusal."""
    path = out / OUTPUT_NAMES[0]
    if not path.is_file():
        return []
    earlier = json.loads(path.read_text())
    # Settings added since the earlier run read as their defaults (what that run did without them).
    defaults = {k: v for k, v in vars(build_parser().parse_args(["--out", "-"])).items() if k not in NOT_COMPARED}
    earlier["settings"] = {**{k: v for k, v in defaults.items() if k not in earlier.get("settings", {})},
                           **earlier.get("settings", {})}
    for key in ("settings", "shared_config", "data"):
        if earlier.get(key) != result[key]:
            old, new = earlier.get(key) or {}, result[key]
            changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            raise ScratchComparisonError(f"--resume: {path} was made with other {key} ({', '.join(changed)}); "
                                         "pass --overwrite to start again")
    return earlier.get("models", [])


if __name__ == "__main__":
    raise SystemExit(main())
