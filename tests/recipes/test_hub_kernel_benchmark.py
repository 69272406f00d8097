"""hf-arch bench hub-kernels: transformers' Qwen3-Next timed with and without hf_arch.use_kernels() in one run."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("kernels")


def test_bench_hub_kernels_json(capsys):
    from hf_arch.cli import main

    assert main(["bench", "hub-kernels", "--seq-lens", "64", "--decode-contexts", "32", "--decode-tokens", "2",
                 "--repeats", "1", "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert results["model"]["type"] == "qwen3_next" and "linear_attention" in results["model"]["layer_types"]
    (train,), (decode,) = results["training"], results["decode"]
    assert train["T"] == 64 and train["transformers_ms"] > 0 and train["hf_arch_ms"] > 0
    assert train["speedup"] == pytest.approx(train["transformers_ms"] / train["hf_arch_ms"])
    assert decode["context"] == 32 and decode["hf_arch_ms_per_token"] > 0 and decode["transformers_prefill_ms"] > 0
