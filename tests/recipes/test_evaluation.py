"""Tests for hf_arch.recipes.evaluation on the real stories260K checkpoint and small hand-built files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from hf_arch.recipes import evaluation as ev


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """The 260K model gains nothing from intra-op threads, and on a shared 2-core box they thrash."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def model_and_tokenizer(stories260k):
    return ev.load_model_and_tokenizer(stories260k)


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------------ perplexity


def test_perplexity_wikitext_sane(model_and_tokenizer, assets):
    model, tok = model_and_tokenizer
    result = ev.perplexity(model, tok, assets / "data/wikitext2_test.txt", max_tokens=4096, show_progress=False)
    assert result["context_length"] == 512  # min(512 positions, model_max_length 512, 1024)
    assert result["stride"] == 256
    assert result["tokens"] == 4095  # every token but the first is scored exactly once
    assert math.isfinite(result["ppl"]) and 50 < result["ppl"] < 600
    assert result["ppl"] == pytest.approx(math.exp(result["nll"]))


def test_perplexity_single_window_matches_model_loss(model_and_tokenizer, tmp_path):
    model, tok = model_and_tokenizer
    text = "Once upon a time, there was a little dog. He liked to run in the park with his friend."
    path = tmp_path / "tiny.txt"
    path.write_text(text, encoding="utf-8")
    ids = tok(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = math.exp(model(input_ids=ids, labels=ids).loss.item())

    result = ev.perplexity(model, tok, path, context_length=256, show_progress=False)
    assert result["tokens"] == ids.shape[1] - 1
    assert result["ppl"] == pytest.approx(expected, rel=1e-5)


def test_perplexity_sliding_windows_match_reference_loop(model_and_tokenizer, tmp_path):
    """Reference: the usual loop that masks old tokens with -100 and lets the model compute the loss."""
    model, tok = model_and_tokenizer
    text = "The cat sat on the mat. It was a sunny day and the birds were singing in the tall green trees. " * 3
    path = tmp_path / "windows.txt"
    path.write_text(text, encoding="utf-8")
    ids = tok(text, return_tensors="pt")["input_ids"]
    for ctx, stride in ((32, 12), (32, 32)):  # overlapping windows; and none (each window's first token unscored)
        _check_against_reference_loop(model, tok, path, ids, ctx, stride)


def _check_against_reference_loop(model, tok, path, ids, ctx, stride):
    total, count, prev_end = 0.0, 0, 0
    for begin in range(0, ids.shape[1], stride):
        end = min(begin + ctx, ids.shape[1])
        window = ids[:, begin:end]
        labels = window.clone()
        labels[:, : -(end - prev_end)] = -100
        n_scored = int((labels[:, 1:] != -100).sum())  # the model shifts labels by one
        with torch.no_grad():
            total += model(input_ids=window, labels=labels).loss.item() * n_scored
        count += n_scored
        prev_end = end
        if end == ids.shape[1]:
            break

    for batch_size in (1, 3):
        result = ev.perplexity(model, tok, path, context_length=ctx, stride=stride, batch_size=batch_size, show_progress=False)
        n_windows = -(-(ids.shape[1] - ctx) // stride) + 1 if ids.shape[1] > ctx else 1
        unscored = n_windows if stride == ctx else 1  # no overlap: every window's first token has no prefix
        assert result["tokens"] == count == ids.shape[1] - unscored
        assert result["nll"] == pytest.approx(total / count, rel=1e-5)


def test_perplexity_bad_files(model_and_tokenizer, tmp_path):
    model, tok = model_and_tokenizer
    missing = tmp_path / "nope.txt"
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        ev.perplexity(model, tok, missing, show_progress=False)
    empty = tmp_path / "blank.txt"
    empty.write_text("  \n\n", encoding="utf-8")
    with pytest.raises(ValueError, match="blank.txt"):
        ev.perplexity(model, tok, empty, show_progress=False)


# ------------------------------------------------------------------------------------------------ multiple choice


@pytest.mark.parametrize(
    "filename, name, n_options",
    [("piqa_valid.jsonl", "piqa_valid", 2), ("arc_easy_test.jsonl", "arc_easy_test", 4), ("winogrande_dev.jsonl", "winogrande_dev", 2)],
)
def test_real_tasks(model_and_tokenizer, assets, filename, name, n_options):
    model, tok = model_and_tokenizer
    task_file = assets / "data" / filename
    loaded_name, items = ev.load_multiple_choice(task_file, limit=20)
    assert loaded_name == name and len(items) == 20
    assert all(len(item.get("continuations", item.get("contexts"))) == n_options for item in items)

    result = ev.multiple_choice(model, tok, task_file, limit=20, show_progress=False)
    assert result["task"] == name and result["n"] == 20
    assert 0.0 <= result["acc"] <= 1.0 and 0.0 <= result["acc_norm"] <= 1.0


def test_formats_are_normalised(assets):
    _, piqa = ev.load_multiple_choice(assets / "data/piqa_valid.jsonl", limit=1)
    assert piqa[0]["context"].startswith("Question: How do I ready a guinea pig cage")
    assert piqa[0]["context"].endswith("\nAnswer:")
    assert all(c.startswith(" ") for c in piqa[0]["continuations"])
    assert piqa[0]["gold"] in (0, 1)

    arc_file = assets / "data/arc_easy_test.jsonl"
    raw = json.loads(arc_file.read_text(encoding="utf-8").splitlines()[0])
    _, arc = ev.load_multiple_choice(arc_file, limit=1)
    assert arc[0]["context"] == raw["query"] + "\nAnswer:"
    assert arc[0]["continuations"] == [" " + c for c in raw["choices"]] and arc[0]["gold"] == raw["gold"]

    _, wino = ev.load_multiple_choice(assets / "data/winogrande_dev.jsonl", limit=1)
    assert wino[0]["contexts"][1].endswith("so Maria")
    assert wino[0]["continuation"] == " always got the easier cases." and wino[0]["gold"] == 1


def _reference_loglikelihood(model, tok, context, continuation):
    """Plain unbatched forward pass; the loss over the continuation labels times their count."""
    ids = tok(context + continuation, return_tensors="pt")["input_ids"]
    n_context = len(tok(context)["input_ids"])
    labels = ids.clone()
    labels[:, :n_context] = -100
    with torch.no_grad():
        loss = model(input_ids=ids, labels=labels).loss.item()
    return -loss * (ids.shape[1] - n_context)


HAND_BUILT = [
    {"query": "Once upon a time, there was a little girl named", "choices": ["Lily.", "zxqv.", "the."], "gold": 0},
    {"query": "The sun was", "choices": ["shining and warm.", "qqq rrr"], "gold": 1},  # deliberately wrong gold
    {"query": "Tom and his mom went to the", "choices": ["park to play.", "xylophone zebra", "park"], "gold": 2},
    {"query": "She was very", "choices": ["happy.", "kzzt"], "gold": 0},
    {"query": "One day, a big", "choices": ["dog", "the the the the", "ran ran"], "gold": 0},
]


def test_scoring_matches_plain_forward(model_and_tokenizer, tmp_path):
    model, tok = model_and_tokenizer
    task_file = _write_jsonl(tmp_path / "hand.jsonl", HAND_BUILT)

    expected_acc = expected_norm = 0
    requests, expected_lls = [], []
    for rec in HAND_BUILT:
        context = rec["query"] + "\nAnswer:"
        lls = [_reference_loglikelihood(model, tok, context, " " + c) for c in rec["choices"]]
        norms = [ll / len(c) for ll, c in zip(lls, rec["choices"])]
        expected_acc += int(max(range(len(lls)), key=lls.__getitem__) == rec["gold"])
        expected_norm += int(max(range(len(norms)), key=norms.__getitem__) == rec["gold"])
        requests += [(context, " " + c) for c in rec["choices"]]
        expected_lls += lls

    got = ev._loglikelihoods(model, tok, requests, batch_size=4, show_progress=False, desc="")
    assert got == pytest.approx(expected_lls, abs=1e-4)

    result = ev.multiple_choice(model, tok, task_file, batch_size=4, show_progress=False)
    assert result["n"] == len(HAND_BUILT)
    assert result["acc"] == expected_acc / len(HAND_BUILT)
    assert result["acc_norm"] == expected_norm / len(HAND_BUILT)
    assert 0 < result["acc"] < 1  # the wrong gold above must cost something; the model gets some right


def test_padding_does_not_change_scores(model_and_tokenizer, assets):
    model, tok = model_and_tokenizer
    _, items = ev.load_multiple_choice(assets / "data/arc_easy_test.jsonl", limit=6)
    requests = [req for item in items for req in ev._requests(item)]
    one = ev._loglikelihoods(model, tok, requests, batch_size=1, show_progress=False, desc="")
    four = ev._loglikelihoods(model, tok, requests, batch_size=4, show_progress=False, desc="")
    assert four == pytest.approx(one, abs=1e-4)

    task_file = assets / "data/arc_easy_test.jsonl"
    r1 = ev.multiple_choice(model, tok, task_file, limit=6, batch_size=1, show_progress=False)
    r4 = ev.multiple_choice(model, tok, task_file, limit=6, batch_size=4, show_progress=False)
    assert r1 == r4


def test_tokenizer_is_not_mutated(model_and_tokenizer, assets):
    model, tok = model_and_tokenizer
    assert tok.pad_token is None
    ev.multiple_choice(model, tok, assets / "data/winogrande_dev.jsonl", limit=2, show_progress=False)
    assert tok.pad_token is None


def test_piqa_labels_sibling_and_explicit(tmp_path):
    records = [{"goal": "Open a jar", "sol1": "twist the lid", "sol2": "eat the lid"}] * 2
    task_file = _write_jsonl(tmp_path / "mini.jsonl", records)
    with pytest.raises(FileNotFoundError, match="mini_labels.lst"):
        ev.load_multiple_choice(task_file)

    (tmp_path / "mini_labels.lst").write_text("0\n1\n", encoding="utf-8")
    name, items = ev.load_multiple_choice(task_file)
    assert name == "mini" and [i["gold"] for i in items] == [0, 1]

    other = tmp_path / "other.lst"
    other.write_text("1\n1\n", encoding="utf-8")
    _, items = ev.load_multiple_choice(task_file, labels_file=other)
    assert [i["gold"] for i in items] == [1, 1]


def test_bad_task_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.jsonl"):
        ev.load_multiple_choice(tmp_path / "absent.jsonl")

    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n", encoding="utf-8")
    with pytest.raises(ValueError, match="empty.jsonl"):
        ev.load_multiple_choice(empty)

    unknown = _write_jsonl(tmp_path / "unknown.jsonl", [HAND_BUILT[0], {"question": "?", "answer": "!"}])
    with pytest.raises(ValueError, match=r"unknown\.jsonl:2: unknown record format"):
        ev.load_multiple_choice(unknown)

    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps(HAND_BUILT[0]) + "\n{not json\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"broken\.jsonl:2: invalid JSON"):
        ev.load_multiple_choice(broken)

    bad_gold = _write_jsonl(tmp_path / "badgold.jsonl", [{"query": "Q", "choices": ["a", "b"], "gold": 5}])
    with pytest.raises(ValueError, match=r"badgold\.jsonl:1: gold=5"):
        ev.load_multiple_choice(bad_gold)

    bad_choices = _write_jsonl(tmp_path / "badchoices.jsonl", [{"query": "Q", "choices": "ab", "gold": 0}])
    with pytest.raises(ValueError, match=r"badchoices\.jsonl:1: malformed"):
        ev.load_multiple_choice(bad_choices)


# ------------------------------------------------------------------------------------------------ task names


def test_known_task_names_resolve_to_the_shared_assets(model_and_tokenizer, assets, monkeypatch):
    monkeypatch.setenv("HF_ARCH_ASSETS", str(assets))
    assert ev.resolve_task("piqa") == ("piqa", (assets / "data/piqa_valid.jsonl").resolve())
    assert ev.resolve_task("arc_easy") == ("arc_easy", (assets / "data/arc_easy_test.jsonl").resolve())
    assert ev.resolve_task("winogrande") == ("winogrande", (assets / "data/winogrande_dev.jsonl").resolve())
    path = assets / "data/arc_easy_test.jsonl"
    assert ev.resolve_task(path) == (None, path) and ev.resolve_task(str(path)) == (None, path)  # paths still work

    model, tok = model_and_tokenizer
    by_name = ev.multiple_choice(model, tok, "arc_easy", limit=3, show_progress=False)
    by_path = ev.multiple_choice(model, tok, path, limit=3, show_progress=False)
    assert by_name["task"] == "arc_easy" and by_path["task"] == "arc_easy_test"
    assert {k: v for k, v in by_name.items() if k != "task"} == {k: v for k, v in by_path.items() if k != "task"}


def test_task_names_default_to_shared_assets_beside_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_ARCH_ASSETS", raising=False)
    (tmp_path / "shared/assets/data").mkdir(parents=True)
    (tmp_path / "shared/assets/data/piqa_valid.jsonl").write_text("{}\n", encoding="utf-8")
    (tmp_path / "repo").mkdir()
    monkeypatch.chdir(tmp_path / "repo")
    assert ev.resolve_task("piqa") == ("piqa", (tmp_path / "shared/assets/data/piqa_valid.jsonl").resolve())


def test_unknown_task_name_is_named_with_the_known_ones(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"'hellaswag'.*piqa, arc_easy, winogrande"):
        ev.resolve_task("hellaswag")
    (tmp_path / "piqa").write_text(json.dumps(HAND_BUILT[0]) + "\n", encoding="utf-8")
    with pytest.raises(FileNotFoundError, match="hellaswag"):  # checked before anything is scored
        ev.evaluate(None, None, tasks=[tmp_path / "piqa", "hellaswag"], show_progress=False)
    assert ev.resolve_task("piqa") == (None, Path("piqa"))  # an existing file wins over the name
    monkeypatch.setenv("HF_ARCH_ASSETS", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match=r"'winogrande' reads .*nowhere.*HF_ARCH_ASSETS"):
        ev.resolve_task("winogrande")


# ------------------------------------------------------------------------------------------------ driver, table, loading


def test_evaluate_and_format_table(model_and_tokenizer, assets):
    model, tok = model_and_tokenizer
    results = ev.evaluate(
        model,
        tok,
        ppl_file=assets / "data/wikitext2_test.txt",
        ppl_max_tokens=1024,
        tasks=[assets / "data/piqa_valid.jsonl", assets / "data/winogrande_dev.jsonl"],
        limit=4,
        show_progress=False,
    )
    assert set(results["tasks"]) == {"piqa_valid", "winogrande_dev"}
    assert results["perplexity"]["tokens"] == 1023
    table = ev.format_table(results)
    lines = table.splitlines()
    assert lines[0].split() == ["metric", "value"]
    assert any(line.startswith("perplexity.ppl ") for line in lines)
    assert any(line.startswith("tasks.piqa_valid.acc ") for line in lines)
    column = lines[0].index("value")  # every value starts in the header's value column
    assert all(line[column - 1] == " " and line[column] != " " for line in lines[2:])

    assert "perplexity" not in ev.evaluate(model, tok, show_progress=False)


def test_load_model_and_tokenizer_bad_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        ev.load_model_and_tokenizer(tmp_path)


# ------------------------------------------------------------------------------------------------ lm-eval hand-off

LOCAL_TASK_YAML = """\
task: hfarch_arc_easy_local
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data_file}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{query}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: gold
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""


@pytest.mark.slow
def test_run_lm_eval_local_task(model_and_tokenizer, stories260k, assets, tmp_path):
    pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install 'hf-arch[eval]')")
    data_file = assets / "data/arc_easy_test.jsonl"
    (tmp_path / "arc_local.yaml").write_text(LOCAL_TASK_YAML.format(data_file=data_file), encoding="utf-8")

    results = ev.run_lm_eval(stories260k, ["hfarch_arc_easy_local"], include_path=tmp_path, limit=5)
    lm = results["hfarch_arc_easy_local"]
    assert 0.0 <= lm["acc,none"] <= 1.0

    # Same prompts, same scoring convention: our scorer must agree with lm-eval's on these 5 items.
    model, tok = model_and_tokenizer
    ours = ev.multiple_choice(model, tok, data_file, limit=5, show_progress=False)
    assert ours["acc"] == pytest.approx(lm["acc,none"])
    assert ours["acc_norm"] == pytest.approx(lm["acc_norm,none"])
