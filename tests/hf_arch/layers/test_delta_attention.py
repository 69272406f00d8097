"""The ``delta`` token mixer (issue 22 item 1, DELTA): dense layers are the source's attention; a selection layer
attends fully and keeps, per query, the head-summed most attended keys plus sinks and window; the sparse layers
after it attend only to that choice. Exact when the budget covers the context; decoding equals the full forward;
bad layouts are refused by name."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import hf_arch
from hf_arch.layers.delta_attention import DeltaOptions, delta_attended_share

SHAPE = dict(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=5, num_attention_heads=4,
             num_key_value_heads=2, pad_token_id=0, eos_token_id=1, bos_token_id=2)


def models(**options):
    """A plain-attention model and the same weights with every layer a delta mixer."""
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(hf_arch.HybridConfig(**SHAPE)).eval()
    config = hf_arch.HybridConfig(**SHAPE, token_mixer_types=["delta"] * 5,
                                  mixer_options={"delta": {"dense_layers": 1, "token_budget": 4, "sink_tokens": 2,
                                                           "window_tokens": 4, **options}})
    delta = AutoModelForCausalLM.from_config(config).eval()
    assert not delta.load_state_dict(base.state_dict()).missing_keys  # the source's projections, key for key
    return base, delta


ROWS = torch.randint(3, 61, (2, 40), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def test_a_budget_that_covers_the_context_is_the_source_exactly():
    base, delta = models(token_budget=64)
    out = delta(ROWS)
    torch.testing.assert_close(out.logits, base(ROWS).logits, rtol=1e-5, atol=1e-5)
    assert delta_attended_share(out) == 1.0
    assert [layer.self_attn.role for layer in delta.model.layers] == ["dense", "selection", "sparse", "selection",
                                                                       "sparse"]


@torch.no_grad()
def test_sparse_layers_attend_only_to_the_selected_keys():
    base, delta = models()
    out = delta(ROWS, output_attentions=True)
    assert len(out.token_selections) == 2  # layers 1 and 3 select
    selection = out.token_selections[0]  # [B, T, S]: what layer 2 attends
    maps = out.attentions  # one per layer: dense, selection, sparse, selection, sparse
    sparse_map = maps[2]
    outside = sparse_map.masked_select(~selection[:, None].expand_as(sparse_map))
    assert outside.abs().max() == 0 and torch.allclose(sparse_map.sum(-1), torch.ones(()))
    # Each query keeps its sinks, its window and at most 4 more: the keys the selection layer attended most.
    chosen = selection.sum(-1)[0]
    assert chosen[:6].tolist() == list(range(1, 7))  # short contexts: everything
    assert int(chosen.max()) <= 2 + 4 + 4
    t = 30
    salience = maps[1][0, :, t].sum(0)  # heads summed, query t of row 0
    forced = {0, 1} | set(range(t - 3, t + 1))
    expected = forced | set(salience.masked_fill(torch.tensor([k in forced or k > t for k in range(40)]),
                                                 -1.0).topk(4).indices.tolist())
    assert set(selection[0, t].nonzero().flatten().tolist()) == expected
    share = delta_attended_share(out)
    assert 0.3 < share < 1.0 and float(torch.stack(out.attended_counts).sum(0)[1]) == 4 * 2 * 40 * 41 / 2
    assert (out.logits - base(ROWS).logits).abs().max() > 1e-3  # sparse now, no longer the source


@torch.no_grad()
def test_decoding_token_by_token_equals_the_full_forward():
    _, delta = models()
    full = delta(ROWS).logits
    out = delta(ROWS[:, :25], use_cache=True)
    cache, steps = out.past_key_values, [out.logits]
    for t in range(25, 40):
        out = delta(ROWS[:, t:t + 1], past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-5, atol=1e-5)
    greedy = delta.generate(ROWS[:, :10], max_new_tokens=12, do_sample=False, pad_token_id=0)
    uncached = delta.generate(ROWS[:, :10], max_new_tokens=12, do_sample=False, pad_token_id=0, use_cache=False)
    assert torch.equal(greedy, uncached)


@torch.no_grad()
def test_left_padding_changes_nothing_for_the_real_tokens():
    _, delta = models()  # sinks and windows count among each query's own keys, not cache slots
    row = ROWS[:1, :30]
    padded = torch.cat([torch.zeros(1, 5, dtype=torch.long), row], 1)
    mask = torch.cat([torch.zeros(1, 5, dtype=torch.long), torch.ones_like(row)], 1)
    torch.testing.assert_close(delta(padded, attention_mask=mask).logits[:, 5:], delta(row).logits, rtol=1e-4,
                               atol=1e-4)


def test_trains_and_round_trips(tmp_path, model_checks):
    _, delta = models()
    model_checks.trains(delta, ROWS[:, :16])
    model_checks.round_trips(delta, ROWS[:, :12], tmp_path)


@pytest.mark.parametrize("options, message", [
    ({"dense_layers": 5}, "dense_layers (5) must be smaller than the number of layers (5)"),
    ({"selection_layers": [2, 3]}, "selection_layers must start at layer 1"),
    ({"selection_layers": [1, 7]}, "selection_layers [7] are out of range"),
    ({"token_budget": 0}, "token_budget must be an integer >= 1"),
    ({"window_tokens": 0}, "window_tokens must be an integer >= 1"),
    ({"top_p": 0.9}, "unknown options ['top_p']"),
])
def test_bad_layouts_are_refused_by_name(options, message):
    config = hf_arch.HybridConfig(**SHAPE, token_mixer_types=["delta"] * 5,
                                  mixer_options={"delta": {"dense_layers": 1, **options}})
    with pytest.raises(ValueError) as err:
        AutoModelForCausalLM.from_config(config)
    assert message in str(err.value)


@torch.no_grad()
def test_a_packed_row_equals_each_sequence_alone():
    _, delta = models()
    first, second = ROWS[0, :18], ROWS[1, :22]
    packed = delta(torch.cat([first, second])[None], position_ids=torch.cat([torch.arange(18), torch.arange(22)])[None],
                   use_cache=False).logits  # as transformers' DataCollatorWithFlattening trains
    torch.testing.assert_close(packed[:, :18], delta(first[None]).logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(packed[:, 18:], delta(second[None]).logits, rtol=1e-4, atol=1e-4)


def test_default_selection_layers():
    assert DeltaOptions(dense_layers=2).roles(8) == ["dense", "dense", "selection", "sparse", "sparse", "selection",
                                                     "sparse", "sparse"]
