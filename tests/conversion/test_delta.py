"""``--to sparse_attention --method delta`` (issue 22 item 1): no training, every weight the source's; the converted
model is the source while each query's context fits its sinks, window and budget, and sparse beyond; layouts that
cannot work are refused by name."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, MistralConfig, MistralForCausalLM

from hf_arch.cli import main
from hf_arch.conversion import max_abs_logit_diff
from hf_arch.conversion.sparsify import SparsifyOptions, sparsify
from hf_arch.layers.delta_attention import delta_attended_share


@pytest.fixture(scope="module")
def source(stories260k):
    return AutoModelForCausalLM.from_pretrained(stories260k, dtype=torch.float32).eval()


def test_short_contexts_are_the_source_and_long_ones_attend_less(source):
    target = sparsify(source, SparsifyOptions(method="delta", dense_layers=1, token_budget=16, sink_tokens=2,
                                              window_tokens=8))
    assert target.config.model_type == "hfa_hybrid" and target.config.token_mixer_types == ["delta"] * 5
    assert [layer.self_attn.role for layer in target.model.layers] == ["dense", "selection", "sparse", "selection",
                                                                        "sparse"]
    short = torch.randint(3, 512, (2, 26), generator=torch.Generator().manual_seed(1))  # 2 + 8 + 16 keys: all
    assert max_abs_logit_diff(source, target, short) < 1e-4
    long = torch.randint(3, 512, (1, 200), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = target(long)
    selection_pairs, sparse_pairs = out.attended_counts[0], out.attended_counts[1]  # layers 1 and 2
    assert selection_pairs[0] == selection_pairs[1] == 200 * 201 // 2  # a selection layer attends everything
    assert float(sparse_pairs[0]) / float(sparse_pairs[1]) < 0.3  # at most 26 keys per query
    assert 0.5 < delta_attended_share(out) < 0.7  # the mean over the selection and sparse layers
    assert (out.logits - source(long).logits).abs().max() > 1e-3


def test_cli_writes_a_model_that_loads_without_hf_arch_options(stories260k, tmp_path, capsys):
    out = tmp_path / "delta"
    assert main(["convert", str(stories260k), str(out), "--to", "sparse_attention", "--method", "delta",
                 "--dense-layers", "1", "--selection-layers", "1", "3", "--token-budget", "32"]) == 0
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert model.config.mixer_options["delta"] == {"dense_layers": 1, "selection_layers": [1, 3],
                                                   "token_budget": 32, "sink_tokens": 4, "window_tokens": 64}
    assert "max |Δlogit| vs source" in capsys.readouterr().out


@pytest.mark.parametrize("options, message", [
    (dict(dense_layers=5), "dense_layers (5) must be smaller than the number of layers (5)"),
    (dict(dense_layers=1, selection_layers=[2]), "selection_layers must start at layer 1"),
    (dict(token_budget=0), "token_budget must be an integer >= 1"),
])
def test_bad_layouts_are_refused_by_name(source, options, message):
    with pytest.raises(ValueError) as err:
        sparsify(source, SparsifyOptions(method="delta", **options))
    assert message in str(err.value)


def test_sliding_window_sources_are_refused_by_name():
    config = MistralConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, sliding_window=8)  # every layer slides
    with pytest.raises(ValueError, match=r"source layers \[0, 1\] are not full attention"):
        sparsify(MistralForCausalLM(config).eval(), SparsifyOptions(method="delta", dense_layers=0))
