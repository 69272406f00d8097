"""Evaluation recipes: sliding-window perplexity, zero-shot multiple choice, and a hand-off to lm-eval.

The built-in scorers need only torch + transformers and read small local files (WikiText-style text,
PIQA / ARC-Easy / WinoGrande jsonl), so they work offline and on CPU. ``run_lm_eval`` hands a checkpoint
directory to lm-evaluation-harness (optional extra ``hf-arch[eval]``) for the full benchmark suite.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

__all__ = [
    "perplexity",
    "KNOWN_TASKS",
    "resolve_task",
    "load_multiple_choice",
    "multiple_choice",
    "evaluate",
    "format_table",
    "run_lm_eval",
    "load_model_and_tokenizer",
]

_DEFAULT_MAX_CONTEXT = 1024

# Task names as lm-eval users type them -> the shared assets' files (relative to the assets folder). PIQA's labels are
# found beside its jsonl (``piqa_valid_labels.lst``).
KNOWN_TASKS = {
    "piqa": "data/piqa_valid.jsonl",
    "arc_easy": "data/arc_easy_test.jsonl",
    "winogrande": "data/winogrande_dev.jsonl",
}


# --------------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------------


def _model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _pad_id(tokenizer) -> int:
    """A pad id for right padding. Padded positions are masked and never scored, so any valid id works;
    we pick one locally instead of mutating the caller's tokenizer."""
    for candidate in (tokenizer.pad_token_id, tokenizer.unk_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def _max_context(model, tokenizer) -> int:
    """min(model positions, tokenizer.model_max_length, 1024); either limit may be missing or a sentinel."""
    limits = [_DEFAULT_MAX_CONTEXT]
    positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(positions, int) and positions > 0:
        limits.append(positions)
    tok_max = getattr(tokenizer, "model_max_length", None)
    if isinstance(tok_max, int) and 0 < tok_max < 1_000_000:
        limits.append(tok_max)
    return min(limits)


@torch.no_grad()
def _token_logprobs(model, sequences: Sequence[Sequence[int]], pad_id: int) -> list[torch.Tensor]:
    """For each sequence, log p(token_i | tokens_<i) for i = 1..len-1 (a 1-D tensor of len-1 values).

    Sequences are right-padded into one batch: with causal attention the real tokens never see the
    padding and keep positions 0..len-1, so scores don't depend on what else is in the batch.
    """
    lengths = [len(s) for s in sequences]
    input_ids = torch.full((len(sequences), max(lengths)), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, seq in enumerate(sequences):
        input_ids[row, : len(seq)] = torch.as_tensor(list(seq), dtype=torch.long)
        attention_mask[row, : len(seq)] = 1
    device = _model_device(model)
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    # cross_entropy over (batch, vocab, time) = -log p of each next token, in fp32 for stable sums.
    nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), input_ids[:, 1:], reduction="none")
    return [-nll[row, : n - 1].cpu() for row, n in enumerate(lengths)]


def _batches(items: list, size: int) -> Iterable[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


# --------------------------------------------------------------------------------------------------
# Perplexity
# --------------------------------------------------------------------------------------------------


def _read_text(text_file) -> tuple[Path, str]:
    path = Path(text_file)
    if not path.is_file():
        raise FileNotFoundError(f"perplexity text file not found: {path}")
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise ValueError(f"perplexity text file is empty: {path}")
    return path, text


def _sliding_windows(n_tokens: int, context_length: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first_scored) per window; each token is scored at most once, by the first window that
    contains it with a prefix, so later windows score only their new tokens but still see up to
    context_length - stride tokens of history. A window's first token has no prefix inside it: with
    ``stride == context_length`` (no overlap) it is never scored, as in the usual -100-label loop."""
    windows, prev_end = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + context_length, n_tokens)
        windows.append((begin, end, max(prev_end, begin + 1)))
        prev_end = end
        if end == n_tokens:
            break
    return windows


def perplexity(
    model,
    tokenizer,
    text_file,
    *,
    context_length: int | None = None,
    stride: int | None = None,
    max_tokens: int | None = None,
    batch_size: int = 1,
    show_progress: bool = True,
) -> dict:
    """Sliding-window perplexity of the whole file, tokenized as one string.

    ``max_tokens`` truncates the token stream first (for quick checks). Returns the mean NLL per scored
    token, its exp, and the window settings used.
    """
    path, text = _read_text(text_file)
    context_length = int(context_length or _max_context(model, tokenizer))
    stride = int(stride or max(1, context_length // 2))
    if context_length < 2:
        raise ValueError(f"context_length must be >= 2, got {context_length}")
    if not 0 < stride <= context_length:
        raise ValueError(f"stride must be in [1, context_length={context_length}], got {stride}")

    # verbose=False: the whole file is longer than model_max_length on purpose; windows handle that.
    ids = tokenizer(text, add_special_tokens=True, verbose=False)["input_ids"]
    if max_tokens is not None:
        ids = ids[: int(max_tokens)]
    if len(ids) < 2:
        raise ValueError(f"{path}: need at least 2 tokens to score, got {len(ids)}")

    windows = _sliding_windows(len(ids), context_length, stride)
    pad_id = _pad_id(tokenizer)
    total_nll, scored = 0.0, 0
    progress = tqdm(total=len(windows), desc=f"ppl {path.name}", disable=not show_progress)
    for batch in _batches(windows, max(1, batch_size)):
        logprobs = _token_logprobs(model, [ids[b:e] for b, e, _ in batch], pad_id)
        for (begin, _end, first), lp in zip(batch, logprobs):
            # lp[j] scores token begin + 1 + j; keep only this window's new tokens.
            new = lp[first - begin - 1 :]
            total_nll -= float(new.double().sum())
            scored += new.numel()
        progress.update(len(batch))
    progress.close()

    nll = total_nll / scored
    return {
        "file": str(path),
        "tokens": scored,
        "nll": nll,
        "ppl": math.exp(nll),
        "context_length": context_length,
        "stride": stride,
    }


# --------------------------------------------------------------------------------------------------
# Multiple-choice tasks
# --------------------------------------------------------------------------------------------------


def _detect_format(record: dict) -> str | None:
    if {"goal", "sol1", "sol2"} <= record.keys():
        return "piqa"
    if {"query", "choices", "gold"} <= record.keys():
        return "arc"
    if {"context_options", "continuation", "gold"} <= record.keys():
        return "winogrande"
    return None


def _assets_dir() -> Path:
    """``$HF_ARCH_ASSETS``, else ``../shared/assets`` seen from the working directory (as the recipes resolve it)."""
    from .schema import DEFAULT_ENV

    return Path(os.environ.get("HF_ARCH_ASSETS") or DEFAULT_ENV["HF_ARCH_ASSETS"]).resolve()


def resolve_task(task) -> tuple[str | None, Path]:
    """``(name, path)`` for a ``tasks`` entry: an existing file is used as it is (``name`` None: the file stem names
    it); a known task name (:data:`KNOWN_TASKS`: ``piqa``, ``arc_easy``, ``winogrande``) maps to the shared assets'
    file under ``$HF_ARCH_ASSETS`` (default ``../shared/assets``). Anything else raises ``FileNotFoundError`` naming
    it and the known names."""
    path = Path(task)
    if path.is_file():
        return None, path
    if isinstance(task, str) and task in KNOWN_TASKS:
        asset = _assets_dir() / KNOWN_TASKS[task]
        if not asset.is_file():
            raise FileNotFoundError(
                f"task {task!r} reads {asset}, which does not exist; set HF_ARCH_ASSETS to the shared assets folder "
                "(the one holding data/), or pass the task's jsonl path"
            )
        return task, asset
    raise FileNotFoundError(
        f"task {str(task)!r} is neither an existing file nor a known task name "
        f"(known: {', '.join(KNOWN_TASKS)}; or pass a PIQA / ARC-Easy / WinoGrande jsonl path)"
    )


def _piqa_labels_path(task_file: Path) -> Path:
    name = task_file.name
    stem = name[: -len(".jsonl")] if name.endswith(".jsonl") else task_file.stem
    return task_file.with_name(f"{stem}_labels.lst")


def _read_labels(labels_file: Path, task_file: Path) -> list[int]:
    if not labels_file.is_file():
        raise FileNotFoundError(
            f"{task_file} is PIQA-style (goal/sol1/sol2) and needs labels, but {labels_file} was not found; "
            "pass labels_file explicitly"
        )
    labels = []
    for lineno, line in enumerate(labels_file.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            labels.append(int(line))
        except ValueError:
            raise ValueError(f"{labels_file}:{lineno}: expected an integer label, got {line!r}") from None
    return labels


def _to_item(fmt: str, record: dict, label: int | None, where: str) -> dict:
    """Normalise one record to {context, continuations, gold} or {contexts, continuation, gold}."""
    try:
        if fmt == "piqa":
            item = {
                "context": f"Question: {record['goal']}\nAnswer:",
                "continuations": [" " + str(record["sol1"]), " " + str(record["sol2"])],
                "gold": int(label),
            }
            n_options = 2
        elif fmt == "arc":
            choices = record["choices"]
            if not isinstance(choices, list) or not choices:
                raise ValueError("'choices' must be a non-empty list")
            item = {
                "context": f"{record['query']}\nAnswer:",
                "continuations": [" " + str(c) for c in choices],
                "gold": int(record["gold"]),
            }
            n_options = len(choices)
        else:  # winogrande
            options = record["context_options"]
            if not isinstance(options, list) or not options:
                raise ValueError("'context_options' must be a non-empty list")
            item = {
                "contexts": [str(c) for c in options],
                "continuation": " " + str(record["continuation"]),
                "gold": int(record["gold"]),
            }
            n_options = len(options)
    except (TypeError, ValueError, KeyError) as exc:
        raise ValueError(f"{where}: malformed {fmt} record: {exc}") from None
    if not 0 <= item["gold"] < n_options:
        raise ValueError(f"{where}: gold={item['gold']} is out of range for {n_options} options")
    return item


def load_multiple_choice(task_file, labels_file=None, limit: int | None = None) -> tuple[str, list[dict]]:
    """Read a PIQA / ARC-Easy (lm-eval style) / WinoGrande (partial style) jsonl file.

    The format is detected from the records' keys; every record must have the same format. Returns the
    task name (the file stem) and items: ``{"context", "continuations", "gold"}`` or, for WinoGrande,
    ``{"contexts", "continuation", "gold"}``.
    """
    path = Path(task_file)
    if not path.is_file():
        raise FileNotFoundError(f"task file not found: {path}")

    records: list[tuple[int, dict]] = []
    with path.open(encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            if limit is not None and len(records) >= limit:
                break
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: invalid JSON: {exc.msg}") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
            records.append((lineno, record))
    if not records:
        raise ValueError(f"task file has no records: {path}")

    fmt = None
    for lineno, record in records:
        found = _detect_format(record)
        if found is None:
            raise ValueError(
                f"{path}:{lineno}: unknown record format with keys {sorted(record)}; expected PIQA "
                "(goal, sol1, sol2), ARC (query, choices, gold) or WinoGrande (context_options, continuation, gold)"
            )
        if fmt is not None and found != fmt:
            raise ValueError(f"{path}:{lineno}: {found} record in a file of {fmt} records")
        fmt = found

    labels: list[int | None] = [None] * len(records)
    if fmt == "piqa":
        labels_path = Path(labels_file) if labels_file is not None else _piqa_labels_path(path)
        labels = _read_labels(labels_path, path)
        if len(labels) < len(records):
            raise ValueError(f"{labels_path} has {len(labels)} labels but {path} has at least {len(records)} records")

    items = [_to_item(fmt, rec, label, f"{path}:{lineno}") for (lineno, rec), label in zip(records, labels)]
    name = path.name[: -len(".jsonl")] if path.name.endswith(".jsonl") else path.stem
    return name, items


def _requests(item: dict) -> list[tuple[str, str]]:
    if "continuations" in item:
        return [(item["context"], cont) for cont in item["continuations"]]
    return [(ctx, item["continuation"]) for ctx in item["contexts"]]


def _encode_request(tokenizer, context: str, continuation: str, max_length: int) -> tuple[list[int], int]:
    """Token ids of context+continuation and the index where the continuation's tokens start.

    Encoding the pair as one string keeps the tokenizer's natural merges at the boundary; the split
    point is the token count of the context alone. Trailing context whitespace moves to the
    continuation (as lm-eval does) so a space is not stranded as its own token.
    """
    stripped = context.rstrip()
    continuation = context[len(stripped) :] + continuation
    context = stripped
    full = tokenizer(context + continuation)["input_ids"]
    start = len(tokenizer(context)["input_ids"])
    if start == 0:  # nothing to condition the first continuation token on (no BOS, empty context)
        raise ValueError(f"context {context!r} produced no tokens; the first continuation token cannot be scored")
    if start >= len(full):
        raise ValueError(f"continuation {continuation!r} produced no tokens after context {context[-40:]!r}")
    if len(full) > max_length:  # keep the end: the continuation matters, the oldest context least
        cut = len(full) - max_length
        full, start = full[cut:], max(1, start - cut)
    return full, start


def _loglikelihoods(model, tokenizer, requests: list[tuple[str, str]], batch_size: int, show_progress: bool, desc: str) -> list[float]:
    """Summed log-probability of each continuation given its context, batched with right padding."""
    max_length = _max_context(model, tokenizer)
    encoded = [_encode_request(tokenizer, ctx, cont, max_length) for ctx, cont in requests]
    # Longest first: similar lengths share a batch, so less padding is computed.
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i][0]))
    pad_id = _pad_id(tokenizer)
    scores = [0.0] * len(encoded)
    progress = tqdm(total=len(order), desc=desc, disable=not show_progress)
    for batch in _batches(order, max(1, batch_size)):
        logprobs = _token_logprobs(model, [encoded[i][0] for i in batch], pad_id)
        for i, lp in zip(batch, logprobs):
            scores[i] = float(lp[encoded[i][1] - 1 :].double().sum())
        progress.update(len(batch))
    progress.close()
    return scores


def _answer_chars(continuation: str) -> int:
    """Character length used by acc_norm: the answer text without the single separating space we
    prepend, as lm-eval counts len(choice) without its target delimiter."""
    text = continuation[1:] if continuation.startswith(" ") else continuation
    return max(1, len(text))


def multiple_choice(
    model,
    tokenizer,
    task_file,
    *,
    labels_file=None,
    limit: int | None = None,
    batch_size: int = 8,
    show_progress: bool = True,
) -> dict:
    """Zero-shot accuracy: pick the option with the highest continuation log-likelihood.

    ``task_file`` is a jsonl path or a known task name (``piqa``, ``arc_easy``, ``winogrande``: the shared assets'
    files, see :func:`resolve_task`); the result's ``task`` is that name, or the file's stem for a path.

    ``acc`` compares summed log-likelihoods; ``acc_norm`` divides each by the answer's length in
    characters (lm-eval's convention), which removes the bias towards short answers.
    """
    known_name, task_path = resolve_task(task_file)
    name, items = load_multiple_choice(task_path, labels_file=labels_file, limit=limit)
    name = known_name or name
    requests = [req for item in items for req in _requests(item)]
    scores = _loglikelihoods(model, tokenizer, requests, batch_size, show_progress, desc=f"mc {name}")

    correct = correct_norm = 0
    cursor = 0
    for item in items:
        reqs = _requests(item)
        lls = scores[cursor : cursor + len(reqs)]
        cursor += len(reqs)
        norms = [ll / _answer_chars(cont) for ll, (_ctx, cont) in zip(lls, reqs)]
        correct += int(max(range(len(lls)), key=lls.__getitem__) == item["gold"])
        correct_norm += int(max(range(len(norms)), key=norms.__getitem__) == item["gold"])
    n = len(items)
    return {"task": name, "n": n, "acc": correct / n, "acc_norm": correct_norm / n,
            "acc_stderr": _accuracy_stderr(correct / n, n), "acc_norm_stderr": _accuracy_stderr(correct_norm / n, n)}


def _accuracy_stderr(accuracy: float, n: int) -> float:
    """Standard error of a mean of ``n`` 0/1 scores (the sample standard deviation over √n, as lm-eval reports)."""
    return math.sqrt(accuracy * (1 - accuracy) / (n - 1)) if n > 1 else float("nan")


# --------------------------------------------------------------------------------------------------
# Driver, table, lm-eval hand-off, loading
# --------------------------------------------------------------------------------------------------


def evaluate(
    model,
    tokenizer,
    *,
    ppl_file=None,
    tasks: Sequence = (),
    limit: int | None = None,
    ppl_max_tokens: int | None = None,
    context_length: int | None = None,
    stride: int | None = None,
    batch_size: int = 8,
    show_progress: bool = True,
) -> dict:
    """Perplexity on ``ppl_file`` (if given) plus every multiple-choice task in ``tasks`` (jsonl paths or known task
    names, see :func:`resolve_task`; all are checked before anything is scored)."""
    tasks = list(tasks)
    for task in tasks:
        resolve_task(task)
    results: dict = {}
    if ppl_file is not None:
        results["perplexity"] = perplexity(
            model,
            tokenizer,
            ppl_file,
            context_length=context_length,
            stride=stride,
            max_tokens=ppl_max_tokens,
            batch_size=batch_size,
            show_progress=show_progress,
        )
    results["tasks"] = {}
    for task_file in tasks:
        result = multiple_choice(model, tokenizer, task_file, limit=limit, batch_size=batch_size, show_progress=show_progress)
        results["tasks"][result["task"]] = result
    return results


def _flatten(prefix: str, value, rows: list[tuple[str, str]]) -> None:
    if isinstance(value, dict):
        for key, sub in value.items():
            _flatten(f"{prefix}.{key}" if prefix else str(key), sub, rows)
    elif isinstance(value, float):
        rows.append((prefix, f"{value:.4f}"))
    else:
        rows.append((prefix, str(value)))


def format_table(results: dict) -> str:
    """Two aligned columns, metric and value, with nested keys joined by dots."""
    rows: list[tuple[str, str]] = []
    _flatten("", results, rows)
    rows = [("metric", "value")] + rows
    width = max(len(metric) for metric, _ in rows)
    lines = [f"{metric.ljust(width)}  {value}" for metric, value in rows]
    lines.insert(1, f"{'-' * width}  {'-' * max(len(v) for _, v in rows)}")
    return "\n".join(lines)


def run_lm_eval(
    model_dir,
    tasks: list[str],
    *,
    include_path=None,
    limit: int | float | None = None,
    batch_size: int | str = 1,
    device: str = "cpu",
) -> dict:
    """Run lm-evaluation-harness (``--model hf``) on a local checkpoint; returns its ``results`` dict.

    ``include_path`` points lm-eval at a folder of extra task YAMLs (e.g. tasks over local files).
    """
    import hf_arch  # noqa: F401  - registers our model types with the Auto classes lm-eval will use

    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError as exc:
        raise ImportError(
            "run_lm_eval needs lm-evaluation-harness: pip install 'hf-arch[eval]'"
        ) from exc

    task_manager = TaskManager(include_path=str(include_path) if include_path is not None else None)
    output = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={model_dir},dtype=float32",
        tasks=list(tasks),
        limit=limit,
        batch_size=batch_size,
        device=device,
        task_manager=task_manager,
    )
    if output is None:  # non-zero ranks in distributed runs get nothing back
        return {}
    return output["results"]


def load_model_and_tokenizer(path, dtype: str | torch.dtype = "float32"):
    """Load a local checkpoint directory (any model type hf_arch registers, or a stock one) for evaluation."""
    import hf_arch  # noqa: F401  - registration must happen before the Auto classes resolve the config
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = Path(path)
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"not a checkpoint directory (no config.json): {directory}")
    torch_dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    if not isinstance(torch_dtype, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}")
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch_dtype)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    model.eval()
    return model, tokenizer
