"""The ``acm`` channel mixer (issue 21 item 5, ACM): a token runs the first ``argmax gate + 1`` learners and gets
their sum, in inference and (straight-through) in training; decoding equals the full forward; options are checked."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import hf_arch

SHAPE = dict(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, pad_token_id=0, eos_token_id=1, bos_token_id=2)


def model(seed=0, learners=4, **options):
    torch.manual_seed(seed)
    config = hf_arch.HybridConfig(**SHAPE, channel_mixer_types=["acm", "acm"],
                                  mixer_options={"acm": {"learners": learners, **options}})
    m = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # a gate that really varies the count
        for layer in m.model.layers:
            layer.mlp.gate_weight.normal_(0, 1.0)
    return m


@torch.no_grad()
def test_each_token_sums_its_first_learners():
    acm = model().model.layers[0].mlp
    x = torch.randn(1, 40, 32, generator=torch.Generator().manual_seed(1))
    counts = acm.learner_counts(x)[0]
    assert len(set(counts.tolist())) > 1  # the test sees several counts
    expected = torch.stack([sum(acm.learners[j](x[0, t]) for j in range(int(counts[t]))) for t in range(40)])
    out, report = acm(x)
    torch.testing.assert_close(out[0], expected, rtol=1e-5, atol=1e-6)
    assert report == {}  # inference: nothing to report
    assert acm.last_learners == pytest.approx(float(counts.float().mean()))


def test_training_forward_is_the_hard_count_and_the_gate_gets_gradients():
    acm = model().model.layers[0].mlp.train()
    x = torch.randn(1, 30, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        acm.gate_bias.copy_(torch.tensor([0.0, 0.0, 50.0, 0.0]))  # Gumbel noise cannot move the choice: 3 learners
    out, report = acm(x)
    assert report == {}  # no compute price configured
    with torch.no_grad():
        expected = sum(acm.learners[j](x) for j in range(3))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    out.pow(2).sum().backward()
    assert acm.gate_weight.grad is not None and acm.gate_weight.grad.abs().sum() > 0  # straight-through
    assert all(p.grad is not None for p in acm.learners[2].parameters())
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in acm.learners[3].parameters())


def test_decodes_like_the_full_forward_trains_and_round_trips(tmp_path, model_checks):
    m = model()
    rows = torch.randint(3, 61, (8, 16), generator=torch.Generator().manual_seed(3))
    model_checks.trains(m, rows)
    model_checks.decodes_like_the_full_forward(m, rows[:2, :12], prefix=5)
    model_checks.round_trips(m, rows[:2, :12], tmp_path)


@torch.no_grad()
def test_learners_split_any_width():
    acm = model(learners=5).model.layers[0].mlp  # 48 neurons: 10, 10, 10, 9, 9
    assert [learner.gate_proj.out_features for learner in acm.learners] == [10, 10, 10, 9, 9]
    x = torch.randn(1, 40, 32, generator=torch.Generator().manual_seed(1))
    counts = acm.learner_counts(x)[0]
    expected = torch.stack([sum(acm.learners[j](x[0, t]) for j in range(int(counts[t]))) for t in range(40)])
    torch.testing.assert_close(acm(x)[0][0], expected, rtol=1e-5, atol=1e-6)


def test_a_compute_price_joins_the_loss_and_closes_gates():
    m = model(compute_loss_weight=0.5).train()
    plain = model(compute_loss_weight=0.0).train()  # the same weights (same seed), no price
    rows = torch.randint(3, 61, (4, 16), generator=torch.Generator().manual_seed(4))
    torch.manual_seed(7)  # the same Gumbel noise for both
    out = m(rows, labels=rows)
    assert len(out.compute_losses) == 2 and all(0 < float(c) <= 0.5 for c in out.compute_losses)
    torch.manual_seed(7)
    base = plain(rows, labels=rows)
    assert base.compute_losses is None and base.compute_loss is None  # no price: nothing reported or added
    torch.testing.assert_close(out.loss, base.loss + torch.stack(out.compute_losses).mean())
    # The price alone moves the gates toward fewer learners (its gradient reaches them through the softmax).
    with torch.no_grad():
        before = float(m.model.layers[0].mlp.learner_counts(m.model.embed_tokens(rows)).float().mean())
    gates = [p for n, p in m.named_parameters() if "gate_" in n and "learners" not in n]
    optimizer = torch.optim.SGD(gates, lr=5.0)
    for _ in range(20):
        optimizer.zero_grad()
        m(rows).compute_loss.backward()
        optimizer.step()
    with torch.no_grad():
        after = float(m.model.layers[0].mlp.learner_counts(m.model.embed_tokens(rows)).float().mean())
    assert after < before, (before, after)
    assert m.eval()(rows).compute_losses is None  # inference: the hard count, no price


def test_from_scratch_every_learner_runs():
    torch.manual_seed(0)
    config = hf_arch.HybridConfig(**SHAPE, channel_mixer_types=["acm", "dense"], mixer_options={"acm": {"learners": 3}})
    m = AutoModelForCausalLM.from_config(config).eval()
    x = torch.randn(1, 10, 32)
    assert torch.equal(m.model.layers[0].mlp.learner_counts(x), torch.full((1, 10), 3))


@pytest.mark.parametrize("options, message", [
    ({"learners": 0}, "learners must be an integer >= 1"),
    ({"learners": 49}, "learners (49) is larger than intermediate_size (48)"),
    ({"gate_tau": 0.0}, "gate_tau must be > 0"),
    ({"compute_loss_weight": -1.0}, "compute_loss_weight must be >= 0"),
    ({"depth": 2}, "unknown options ['depth']"),
])
def test_bad_options_are_refused_by_name(options, message):
    config = hf_arch.HybridConfig(**SHAPE, channel_mixer_types=["acm", "acm"], mixer_options={"acm": options})
    with pytest.raises(ValueError) as err:
        AutoModelForCausalLM.from_config(config)
    assert message in str(err.value)
