"""Recall probes: can the model retrieve what it has read? Generated from the model's own vocabulary, nothing
downloaded (``hf-arch eval MODEL --recall``).

The hybrid study ("A Systematic Analysis of Hybrid Linear Attention") finds language modelling insensitive to the
linear : full ratio while recall improves as full-attention layers are added; Lizard and STILL claim recall gains.
Perplexity cannot show that, these probes can:

- **MQAR** (multi-query associative recall, Zoology): ``P`` key-value token pairs ``k₁ v₁ … k_P v_P``, then every key
  again in a new order, each followed by its value. A query is answered when the model's next-token argmax after a
  repeated key is that key's value: in-context copying (induction), which a fixed-size recurrent state loses as the
  pairs outgrow it. Keys and values are distinct single tokens that decode to words; a vocabulary too small for
  ``length / 4`` pairs gets fewer pairs and distractor tokens between the pairs and the queries, so the distance
  still grows with the length.
- **Passkey** (Mohtashami & Jaggi): a five-digit number stated once at a given depth of repetitive filler text,
  asked for at the end; answered when the greedy continuation contains it.

Accuracy comes with its standard error and the number of scored items.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass

import torch

__all__ = ["RecallSettings", "format_recall_table", "mqar_sequence", "passkey_prompt", "recall_probe",
           "word_tokens"]

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
PASSKEY_DEPTHS = (0.1, 0.5, 0.9)  # where in the filler the key is stated (fraction of the prompt)


@dataclass(frozen=True)
class RecallSettings:
    lengths: tuple[int, ...] = (256, 512, 1024)  # tokens per MQAR sequence / passkey prompt
    samples: int = 16  # MQAR sequences and passkey prompts per length
    pairs: int | None = None  # MQAR key-value pairs per sequence (None: length // 4, the hardest)
    batch_size: int = 4
    seed: int = 0
    mqar: bool = True
    passkey: bool = True

    def __post_init__(self) -> None:
        if not self.lengths or any(not isinstance(n, int) or n < 16 for n in self.lengths):
            raise ValueError(f"recall lengths must be integers >= 16 (tokens), got {self.lengths!r}")
        for name in ("samples", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"recall {name} must be a positive integer, got {value!r}")
        if self.pairs is not None and not (isinstance(self.pairs, int) and 1 <= self.pairs <= min(self.lengths) // 4):
            raise ValueError(f"recall pairs must be an integer in [1, shortest length // 4 = "
                             f"{min(self.lengths) // 4}], got {self.pairs!r}")
        if not (self.mqar or self.passkey):
            raise ValueError("recall: nothing to run (mqar and passkey both off)")


def word_tokens(tokenizer, minimum_whole_words: int = 64) -> list[int]:
    """Ids of ordinary tokens that decode to a word of letters (no special, byte or punctuation tokens): whole words
    (with their leading space) where the vocabulary has ``minimum_whole_words`` of them, else word pieces too."""
    special = set(tokenizer.all_special_ids)
    whole, pieces = [], []
    for token_id in range(len(tokenizer)):
        if token_id in special:
            continue
        text = tokenizer.convert_tokens_to_string([tokenizer.convert_ids_to_tokens(token_id)])
        word = text.strip()
        if len(word) >= 2 and word.isalpha() and word.isascii():
            (whole if text.startswith(" ") else pieces).append(token_id)
    return whole if len(whole) >= minimum_whole_words else whole + pieces


def mqar_sequence(candidates: list[int], length: int, rng: random.Random,
                  pairs: int | None = None) -> tuple[list[int], list[tuple[int, int]]]:
    """One MQAR sequence of exactly ``length`` tokens and its queries ``(position of the repeated key, value)``:
    ``pairs`` key-value pairs (default ``length // 4``, the most that fit), distractors filling the rest."""
    if pairs is not None and not 1 <= pairs <= length // 4:
        raise ValueError(f"MQAR pairs must be in [1, length // 4 = {length // 4}] for length {length}, got {pairs!r}")
    pairs = min(pairs or length // 4, len(candidates) // 2)
    if pairs < 1:
        raise ValueError(f"MQAR needs at least 2 word tokens in the vocabulary, found {len(candidates)}")
    chosen = rng.sample(candidates, 2 * pairs)
    keys, values = chosen[:pairs], chosen[pairs:]
    context = [token for pair in zip(keys, values) for token in pair]
    distractors = [t for t in candidates if t not in set(keys)] or candidates
    filler = [rng.choice(distractors) for _ in range(length - 4 * pairs)]
    order = rng.sample(range(pairs), pairs)
    sequence, queries = context + filler, []
    for i in order:
        queries.append((len(sequence), values[i]))
        sequence += [keys[i], values[i]]
    return sequence, queries


def passkey_prompt(tokenizer, length: int, depth: float, rng: random.Random) -> tuple[list[int], str]:
    """A prompt of about ``length`` tokens stating a five-digit key at ``depth``, and the key."""
    key = str(rng.randint(10000, 99999))
    head = "There is important information hidden inside a lot of irrelevant text. Find it and memorize it. "
    needle = f"The pass key is {key}. Remember it. {key} is the pass key. "
    question = "What is the pass key? The pass key is"
    fixed = len(tokenizer(head + needle + question, add_special_tokens=False).input_ids)
    per_filler = max(1, len(tokenizer(FILLER, add_special_tokens=False).input_ids))
    repeats = max(1, (length - fixed) // per_filler)
    before = round(repeats * depth)
    text = head + FILLER * before + needle + FILLER * (repeats - before) + question
    return tokenizer(text).input_ids, key


def _stderr(accuracy: float, n: int) -> float:
    return math.sqrt(accuracy * (1 - accuracy) / (n - 1)) if n > 1 else float("nan")


def _device(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def _mqar(model, candidates: list[int], settings: RecallSettings, progress) -> dict:
    results = {}
    for length in settings.lengths:
        rng = random.Random(f"{settings.seed}-mqar-{length}")
        sequences = [mqar_sequence(candidates, length, rng, settings.pairs) for _ in range(settings.samples)]
        correct = total = 0
        for start in range(0, len(sequences), settings.batch_size):
            batch = sequences[start:start + settings.batch_size]
            ids = torch.tensor([s for s, _ in batch], device=_device(model))
            predictions = model(ids, use_cache=False).logits.argmax(-1)
            for row, (_, queries) in enumerate(batch):
                for position, value in queries:
                    correct += int(predictions[row, position] == value)
                    total += 1
            progress.update(1)
        accuracy = correct / total
        results[str(length)] = {"accuracy": accuracy, "stderr": _stderr(accuracy, total), "queries": total,
                                "pairs_per_sequence": len(sequences[0][1]), "sequences": len(sequences)}
    return results


@torch.no_grad()
def _passkey(model, tokenizer, settings: RecallSettings, progress) -> dict:
    results = {}
    for length in settings.lengths:
        rng = random.Random(f"{settings.seed}-passkey-{length}")
        correct, by_depth, lengths = 0, {str(d): [0, 0] for d in PASSKEY_DEPTHS}, []
        for i in range(settings.samples):
            depth = PASSKEY_DEPTHS[i % len(PASSKEY_DEPTHS)]
            ids, key = passkey_prompt(tokenizer, length, depth, rng)
            lengths.append(len(ids))
            prompt = torch.tensor([ids], device=_device(model))
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
            out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False,
                                 pad_token_id=pad)
            found = key in tokenizer.decode(out[0, len(ids):])
            correct += found
            by_depth[str(depth)][0] += found
            by_depth[str(depth)][1] += 1
            progress.update(1)
        accuracy = correct / settings.samples
        results[str(length)] = {"accuracy": accuracy, "stderr": _stderr(accuracy, settings.samples),
                                "prompts": settings.samples, "prompt_tokens": [min(lengths), max(lengths)],
                                "accuracy_by_depth": {d: hits / n for d, (hits, n) in by_depth.items() if n}}
    return results


def recall_probe(model, tokenizer, settings: RecallSettings | None = None, progress: bool = True) -> dict:
    """``{"settings", "mqar": {length: {...}}, "passkey": {length: {...}}}`` for a causal LM and its tokenizer."""
    from tqdm.auto import tqdm

    settings = settings or RecallSettings()
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit and max(settings.lengths) > limit:
        raise ValueError(f"recall length {max(settings.lengths)} exceeds the model's max_position_embeddings "
                         f"({limit})")
    steps = (len(settings.lengths) * -(-settings.samples // settings.batch_size) if settings.mqar else 0) + (
        len(settings.lengths) * settings.samples if settings.passkey else 0)
    bar = tqdm(total=steps, desc="recall", disable=not progress)
    results = {"settings": asdict(settings)}
    if settings.mqar:
        candidates = word_tokens(tokenizer)
        results["mqar"] = _mqar(model, candidates, settings, bar)
        results["mqar_vocabulary"] = len(candidates)
    if settings.passkey:
        results["passkey"] = _passkey(model, tokenizer, settings, bar)
    bar.close()
    return results


def format_recall_table(results: dict) -> str:
    lines = ["| probe | length | accuracy | ± stderr | scored |", "|---|---|---|---|---|"]
    for probe, count in (("mqar", "queries"), ("passkey", "prompts")):
        for length, row in results.get(probe, {}).items():
            lines.append(f"| {probe} | {length} | {row['accuracy']:.3f} | {row['stderr']:.3f} | {row[count]} |")
    return "\n".join(lines)
