"""Recall probes (recipes/recall_probe.py): MQAR sequences and passkey prompts built from the model's vocabulary,
scored so that a model that recalls scores 1 and one that cannot scores 0; ``hf-arch eval --recall`` end to end."""

from __future__ import annotations

import json
import random
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoTokenizer

from hf_arch.recipes.recall_probe import RecallSettings, mqar_sequence, passkey_prompt, recall_probe, word_tokens


class _InductionOracle(torch.nn.Module):
    """Predicts, at every position, the token that followed the previous occurrence of the current token (perfect
    in-context recall); ``recall=False`` predicts the current token itself (no recall)."""

    def __init__(self, vocab: int, recall: bool = True):
        super().__init__()
        self.vocab, self.recall = vocab, recall
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.config = SimpleNamespace(max_position_embeddings=4096)

    def forward(self, ids, use_cache=False):
        logits = torch.zeros(*ids.shape, self.vocab)
        for b, row in enumerate(ids.tolist()):
            following = {}
            for t, token in enumerate(row):
                guess = following.get(token, token) if self.recall else token
                logits[b, t, guess] = 1.0
                if t + 1 < len(row):
                    following[token] = row[t + 1]
        return SimpleNamespace(logits=logits)


@pytest.fixture(scope="module")
def tokenizer(stories260k):
    return AutoTokenizer.from_pretrained(stories260k)


def test_mqar_sequences_hold_what_they_promise(tokenizer):
    candidates = word_tokens(tokenizer)
    assert len(candidates) >= 8 and all(tokenizer.decode([t]).strip().isalpha() for t in candidates)
    for length in (16, 100, 1000):  # 1000: more pairs than the vocabulary has, so distractors fill the gap
        sequence, queries = mqar_sequence(candidates, length, random.Random(length))
        assert len(sequence) == length
        keys = sequence[: 2 * len(queries)][0::2]
        assert len(set(keys)) == len(keys) == len(queries)
        for position, value in queries:
            key = sequence[position]
            assert sequence[position + 1] == value and sequence[sequence.index(key) + 1] == value


def test_fewer_pairs_leave_distractors_between_the_pairs_and_their_queries(tokenizer):
    candidates = word_tokens(tokenizer)
    sequence, queries = mqar_sequence(candidates, 128, random.Random(0), pairs=4)
    assert len(sequence) == 128 and len(queries) == 4
    assert [p for p, _ in queries] == [120, 122, 124, 126]  # asked at the end, 112+ tokens after the pairs
    keys = sequence[:8:2]
    assert sorted(sequence[p] for p, _ in queries) == sorted(keys) and all(k not in sequence[8:120] for k in keys)
    settings = RecallSettings(lengths=(64, 128), samples=3, pairs=4, passkey=False)
    scores = recall_probe(_InductionOracle(len(tokenizer)), tokenizer, settings, progress=False)["mqar"]
    assert [scores[n]["pairs_per_sequence"] for n in ("64", "128")] == [4, 4]
    assert all(scores[n]["accuracy"] == 1.0 for n in ("64", "128"))
    with pytest.raises(ValueError, match=r"MQAR pairs must be in \[1, length // 4 = 16\]"):
        mqar_sequence(candidates, 64, random.Random(0), pairs=17)
    with pytest.raises(ValueError, match="recall pairs must be an integer"):
        RecallSettings(lengths=(32, 64), pairs=9)


def test_scores_separate_a_model_that_recalls_from_one_that_cannot(tokenizer):
    settings = RecallSettings(lengths=(64, 200), samples=3, passkey=False)
    perfect = recall_probe(_InductionOracle(len(tokenizer)), tokenizer, settings, progress=False)
    none = recall_probe(_InductionOracle(len(tokenizer), recall=False), tokenizer, settings, progress=False)
    for length in ("64", "200"):
        assert perfect["mqar"][length]["accuracy"] == 1.0 and none["mqar"][length]["accuracy"] == 0.0
        assert perfect["mqar"][length]["queries"] == 3 * perfect["mqar"][length]["pairs_per_sequence"]


def test_passkey_prompts_state_the_key_at_its_depth(tokenizer):
    for depth in (0.1, 0.9):
        ids, key = passkey_prompt(tokenizer, 300, depth, random.Random(0))
        text = tokenizer.decode(ids)
        assert 240 <= len(ids) <= 330 and text.count(key) == 2 and text.rstrip().endswith("The pass key is")
        assert abs(text.index(key) / len(text) - depth) < 0.15


def test_eval_recall_cli_on_a_real_model(stories260k, capsys):
    from hf_arch.cli import main

    runs = []
    for _ in range(2):
        assert main(["eval", str(stories260k), "--recall", "--recall-lengths", "32", "64", "--recall-samples", "3",
                     "--json"]) == 0
        runs.append(json.loads(capsys.readouterr().out)["recall"])
    assert runs[0] == runs[1]  # seeded: the same sequences and prompts every time
    for probe, count in (("mqar", "queries"), ("passkey", "prompts")):
        for length in ("32", "64"):
            row = runs[0][probe][length]
            assert 0.0 <= row["accuracy"] <= 1.0 and row[count] > 0


def test_bad_settings_are_refused_by_name(tokenizer):
    with pytest.raises(ValueError, match="recall lengths must be integers >= 16"):
        RecallSettings(lengths=(8,))
    with pytest.raises(ValueError, match="samples must be a positive integer"):
        RecallSettings(samples=0)
    with pytest.raises(ValueError, match="exceeds the model's max_position_embeddings"):
        recall_probe(_InductionOracle(len(tokenizer)), tokenizer, RecallSettings(lengths=(8192,)), progress=False)
