"""Greedy-generation agreement with a source model, because log-likelihood scores can hide a converted model that no
longer generates: the same held-out prompts are continued greedily by both, and the continuations compared token by
token.

    prompts = held_out_prompts("eval.txt", tokenizer, n=200)
    reference = greedy_continuations(source, tokenizer, prompts)
    agreement(reference, greedy_continuations(converted, tokenizer, prompts))
    # {"prompts": 200, "new_tokens": 32, "token_agreement": 0.71, "token_agreement_stderr": 0.02,
    #  "prefix_tokens_mean": 17.3, "identical": 0.41}
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch
from tqdm.auto import tqdm


def held_out_prompts(text_file, tokenizer, n: int = 200, prompt_tokens: int = 32) -> list[list[int]]:
    """The first ``prompt_tokens`` tokens of each of the first ``n`` documents (separated by blank lines, which may
    hold spaces as WikiText's do) of ``text_file`` that have at least that many tokens; refuses a text with too few."""
    text = Path(text_file).read_text(encoding="utf-8")
    prompts = []
    for document in re.split(r"\n[ \t]*\n", text):
        ids = tokenizer(document.strip(), add_special_tokens=True, verbose=False)["input_ids"]
        if len(ids) >= prompt_tokens:
            prompts.append(ids[:prompt_tokens])
            if len(prompts) == n:
                return prompts
    raise ValueError(f"{text_file}: only {len(prompts)} documents (blank-line separated) have {prompt_tokens} or more "
                     f"tokens; the generation check asks for {n} prompts (lower their number or their length)")


@torch.no_grad()
def greedy_continuations(model, tokenizer, prompts: list[list[int]], new_tokens: int = 32, batch_size: int = 25,
                         show_progress: bool = True) -> list[list[int]]:
    """``new_tokens`` greedy tokens after each prompt (batched, left-padded, exactly ``new_tokens`` each: an EOS
    does not end a row early, so every continuation is compared at every position)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad nor an EOS token to pad prompts with")
    device = next(model.parameters()).device
    outputs = []
    batches = range(0, len(prompts), batch_size)
    for start in tqdm(batches, desc="greedy continuations", disable=not show_progress):
        batch = prompts[start:start + batch_size]
        width = max(len(p) for p in batch)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=device)
        generated = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=new_tokens,
                                   min_new_tokens=new_tokens, pad_token_id=pad)
        outputs.extend(generated[:, width:].tolist())
    return outputs


def agreement(reference: list[list[int]], candidate: list[list[int]]) -> dict:
    """Token-by-token agreement of ``candidate`` with ``reference`` continuations of the same prompts: the share of
    positions that match (with its standard error over prompts), the mean number of leading tokens that match before
    the first divergence, and the share of continuations that are identical."""
    if len(reference) != len(candidate):
        raise ValueError(f"{len(reference)} reference continuations but {len(candidate)} candidates")
    if not reference:
        raise ValueError("no continuations to compare")
    shares, prefixes = [], []
    for ref, cand in zip(reference, candidate):
        if len(ref) != len(cand):
            raise ValueError(f"continuations differ in length ({len(ref)} vs {len(cand)}); generate both with the "
                             "same new_tokens")
        same = [a == b for a, b in zip(ref, cand)]
        shares.append(sum(same) / len(same))
        prefixes.append(same.index(False) if False in same else len(same))
    n = len(shares)
    mean = sum(shares) / n
    variance = sum((s - mean) ** 2 for s in shares) / (n - 1) if n > 1 else 0.0
    return {"prompts": n, "new_tokens": len(reference[0]), "token_agreement": round(mean, 4),
            "token_agreement_stderr": round(math.sqrt(variance / n), 4),
            "prefix_tokens_mean": round(sum(prefixes) / n, 2),
            "identical": round(sum(p == len(reference[0]) for p in prefixes) / n, 4)}
