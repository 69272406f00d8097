"""lm-evaluation-harness on what hf-arch writes: one converted stories260K of each conversion kind, through
``--model hf`` in-process (hf_arch imported), through ``trust_remote_code`` in a process that never imports hf_arch,
and a native export loaded by plain transformers. A local multiple-choice task over the ARC-Easy asset, offline."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from hf_arch.conversion import convert
from hf_arch.conversion.native_export import export_native
from hf_arch.recipes import evaluation as ev

from .test_evaluation import LOCAL_TASK_YAML

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install 'hf-arch[eval]')")

TASK = "hfarch_arc_easy_local"
# One of each conversion kind (small and fast; the MoE keeps every expert active, so its untrained router is
# exportable natively).
KINDS = {
    "gated_attention": dict(to="gated_attention"),
    "liger": dict(to="gla", method="liger"),
    "mamba_init": dict(to="gated_deltanet", method="mamba_init"),
    "moe": dict(to="moe", method="partition", experts=4, top_k=4, split="random", shared_neurons=0,
                router_distill_steps=0),
    "seer": dict(to="sparse_attention", method="seer", block_size=16),
}


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory, assets):
    folder = tmp_path_factory.mktemp("tasks")
    (folder / "arc_local.yaml").write_text(LOCAL_TASK_YAML.format(data_file=assets / "data/arc_easy_test.jsonl"))
    return folder


@pytest.fixture(scope="module")
def converted(tmp_path_factory, stories260k):
    root = tmp_path_factory.mktemp("converted")
    return {name: convert(stories260k, root / name, **options).output_dir for name, options in KINDS.items()}


def _accuracy(results) -> float:
    value = results[TASK]["acc,none"]
    assert 0.0 <= value <= 1.0
    return value


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_lm_eval_in_process(converted, task_dir, kind):
    _accuracy(ev.run_lm_eval(converted[kind], [TASK], include_path=task_dir, limit=4))


def _lm_eval_in_a_plain_process(model_dir, task_dir, model_args: str, tmp_path) -> dict:
    """``python -m lm_eval`` in a fresh interpreter (hf_arch never imported there), offline."""
    out = tmp_path / "lm_eval_out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={model_dir},{model_args}",
         "--tasks", TASK, "--include_path", str(task_dir), "--limit", "4", "--device", "cpu",
         "--output_path", str(out)], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    files = sorted(out.rglob("results*.json"))
    assert files, f"lm_eval wrote no results under {out}"
    return json.loads(files[-1].read_text())["results"]


def test_lm_eval_through_remote_code(converted, task_dir, tmp_path):
    """A converted model's own modeling code (written at conversion) serves lm-eval with trust_remote_code."""
    results = _lm_eval_in_a_plain_process(converted["mamba_init"], task_dir, "dtype=float32,trust_remote_code=True",
                                          tmp_path)
    in_process = ev.run_lm_eval(converted["mamba_init"], [TASK], include_path=task_dir, limit=4)
    assert _accuracy(results) == pytest.approx(_accuracy(in_process))


def test_lm_eval_on_a_native_export(converted, task_dir, tmp_path, stories260k):
    native = tmp_path / "native"
    record = export_native(converted["moe"], native)
    assert record["model_type"] == "mixtral"
    # stories260K's experts are 43 wide: 172-byte rows, which transformers' default grouped_mm cannot take on CPU
    assert record["experts_implementation"].startswith("eager (expert width 43")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (native / name).is_file()
    results = _lm_eval_in_a_plain_process(native, task_dir, "dtype=float32", tmp_path)
    in_process = ev.run_lm_eval(converted["moe"], [TASK], include_path=task_dir, limit=4)
    assert _accuracy(results) == pytest.approx(_accuracy(in_process))
