"""The MoE papers' routers (issue 21 item 2) and DynaMoE (item 3): each rule against a direct reference, each trains
(loss falls) and decodes like the full forward, and state they carry (Sinkhorn's potentials, THOR's projection, the
dense-to-sparse temperature) is saved and reloaded."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

import hf_arch
from hf_arch.configuration import moe_layer_capacity
from hf_arch.layers.moe_losses import consistency_loss, load_balance_loss
from hf_arch.layers.moe_routers import MoERouter, selected_mask
from hf_arch.layers.moe_routers.dynamic_topk import experts_per_token
from hf_arch.layers.moe_routers.sinkhorn import sinkhorn_column_potential

TINY = dict(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, num_experts=6, num_experts_per_tok=2, moe_intermediate_size=16,
            pad_token_id=0, eos_token_id=1, bos_token_id=2)
ROUTERS = {
    "sinkhorn": dict(moe_preset="sinkhorn"),
    "thor": dict(moe_preset="thor"),
    "dense_to_sparse": dict(moe_router="activation_dense_to_sparse", moe_router_temperature=0.5),
    "sqrt_gate": dict(moe_router="sqrt_gate", num_experts_per_tok=3),
    "dynamic_threshold": dict(moe_router="dynamic_topk", num_experts_per_tok=4, moe_dynamic_threshold=0.6),
    "dynamic_complexity_pyramid": dict(moe_router="dynamic_topk", moe_dynamic_k="complexity", num_experts_per_tok=4,
                                       moe_capacity_schedule="pyramid", num_hidden_layers=3),
}


def router(seed: int = 0, **overrides) -> MoERouter:
    torch.manual_seed(seed)
    r = MoERouter(hf_arch.MoEConfig(**{**TINY, **overrides}), TINY["num_experts"], False)
    r.init_parameters(torch.nn.init)
    return r


def tokens(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, TINY["hidden_size"], generator=torch.Generator().manual_seed(seed))


# --- Selective Sinkhorn ---------------------------------------------------------------------------------------------

def test_sinkhorn_potential_balances_the_transport_plan():
    logits = torch.randn(64, 6, dtype=torch.float64) + torch.tensor([3.0, 1.0, 0, 0, 0, -2.0], dtype=torch.float64)
    log_v = sinkhorn_column_potential(logits, 300, torch.zeros(6, dtype=torch.float64))
    rows = (logits + log_v).softmax(-1)  # each token's row of the plan, normalised: what routing uses
    torch.testing.assert_close(rows.sum(0), torch.full((6,), 64 / 6, dtype=torch.float64), rtol=1e-6, atol=1e-6)
    assert log_v[0] < log_v[5]  # the favoured expert is pushed down, the neglected one up
    assert abs(float(log_v.mean())) < 1e-12


def test_sinkhorn_runs_only_on_imbalanced_training_batches_and_inference_is_per_token():
    r = router(moe_router="sinkhorn", moe_load_balance_coef=0.0, moe_sinkhorn_imbalance=1.5).train()
    skew = torch.tensor([4.0, 0, 0, 0, 0, 0])
    logits = torch.randn(96, 6, generator=torch.Generator().manual_seed(2)) + skew  # expert 0 is everyone's first
    plain = torch.bincount(logits.topk(2, -1).indices.reshape(-1), minlength=6)
    assert plain[0] == 96
    routing = r.route(logits)
    assert r.sinkhorn_batches == 1 and r.training_batches == 1
    load = torch.bincount(routing.expert_idx, minlength=6)
    assert load.max() < plain.max() and load[0] < 96  # Sinkhorn spread the load
    assert float(r.column_potential[0]) < 0  # carried forward for the next batches and for inference
    torch.testing.assert_close(routing.logits, logits + r.column_potential / (1 - 0.9))  # first update from 0
    # a balanced batch leaves the potential alone: 48 tokens, each clearly preferring one of three expert pairs
    before = r.column_potential.clone()
    pairs = torch.tensor([[5.0, 5, 0, 0, 0, 0], [0, 0, 5, 5, 0, 0], [0, 0, 0, 0, 5, 5]]).repeat(16, 1)
    r.route(pairs)
    assert r.sinkhorn_batches == 1 and r.training_batches == 2 and torch.equal(r.column_potential, before)
    # inference: routing a batch equals routing each token alone (no batch coupling)
    r.eval()
    x = tokens(8)
    together = r(x)
    for i in range(8):
        alone = r(x[i:i + 1])
        torch.testing.assert_close(alone.weight, together.weight[2 * i:2 * i + 2])
        assert torch.equal(alone.expert_idx, together.expert_idx[2 * i:2 * i + 2])


# --- THOR ---------------------------------------------------------------------------------------------------------

def test_stochastic_router_draws_uniform_experts_in_training_and_is_fixed_at_inference():
    r = router(moe_router="stochastic", moe_load_balance_coef=0.0)
    assert not any(p.requires_grad for p in r.parameters())  # no learned gate
    x = tokens(3000)
    r.train()
    first, second = r(x), r(x)
    assert not torch.equal(first.expert_idx, second.expert_idx)
    load = torch.bincount(first.expert_idx, minlength=6).float()
    expected = 3000 * 2 / 6
    assert ((load - expected).abs() < 5 * math.sqrt(expected)).all()  # uniform within 5 sigma
    assert torch.equal(first.selected_mask().sum(-1), torch.full((3000,), 2))  # two distinct experts per token
    torch.testing.assert_close(first.weight, torch.full((6000,), 0.5))
    r.eval()
    a, b = r(x[:10]), r(x[:10])
    assert torch.equal(a.expert_idx, b.expert_idx)
    assert torch.equal(a.expert_idx.view(10, 2).sort(-1).values,
                       (x[:10] @ r.projection.t()).topk(2, -1).indices.sort(-1).values)


def test_thor_projection_is_drawn_when_the_model_is_built_and_saved_with_it(tmp_path):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(hf_arch.MoEConfig(**TINY, **ROUTERS["thor"]))
    projections = [layer.mlp.router.projection for layer in model.model.layers]
    assert all(torch.isfinite(p).all() and 0.7 < float(p.std()) < 1.3 for p in projections)
    assert not torch.equal(projections[0], projections[1])
    model.save_pretrained(tmp_path, remote_code=False)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert all(torch.equal(a.mlp.router.projection, b.mlp.router.projection)
               for a, b in zip(model.model.layers, reloaded.model.layers))


def test_thor_training_loss_is_both_passes_plus_their_consistency():
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(hf_arch.MoEConfig(**TINY, **ROUTERS["thor"],
                                                               moe_consistency_coef=0.7)).train()
    ids = torch.randint(3, 61, (2, 10), generator=torch.Generator().manual_seed(4))
    labels = ids.clone()
    labels[0, :3] = -100
    torch.manual_seed(11)
    loss = model(ids, labels=labels).loss
    torch.manual_seed(11)  # the same draws, pass by pass
    first = model(ids).logits
    second = model(ids).logits
    ce = [model.loss_function(logits=l, labels=labels, vocab_size=61) for l in (first, second)]
    expected = 0.5 * (ce[0] + ce[1]) + 0.7 * consistency_loss(first, second, labels)
    torch.testing.assert_close(loss, expected)
    assert consistency_loss(first, second, labels) > 0  # the two passes really routed differently
    assert float(consistency_loss(first, first, labels)) == pytest.approx(0.0, abs=1e-6)


# --- dense-to-sparse gate -------------------------------------------------------------------------------------------

def test_dense_to_sparse_gate_activates_fewer_experts_as_the_temperature_falls():
    r = router(moe_router="activation_dense_to_sparse", moe_router_threshold=0.1, moe_router_activation="gelu").eval()
    x = tokens(200) * 8
    logits = r.compute_logits(x)
    torch.testing.assert_close(logits, torch.nn.functional.gelu(x @ r.weight.t()) / r.temperature)
    counts = []
    for temperature in (1000.0, 1.0, 0.01):
        r.temperature.fill_(temperature)
        routing = r(x)
        mask = routing.selected_mask()
        gate = r.compute_logits(x).softmax(-1)
        reference = (gate >= 0.1) | torch.nn.functional.one_hot(gate.argmax(-1), 6).bool()
        assert torch.equal(mask, reference)
        assert torch.equal(mask, selected_mask(r.compute_logits(x), "activation_dense_to_sparse", 2, r_config(r)))
        torch.testing.assert_close(routing.weight, gate[routing.token_idx, routing.expert_idx])
        counts.append(mask.sum(-1).float().mean().item())
    assert counts[0] == 6.0 and counts[2] < 1.1 and counts[0] > counts[1] > counts[2]


def r_config(r):
    return hf_arch.MoEConfig(**TINY, moe_router="activation_dense_to_sparse", moe_router_threshold=r.threshold)


def test_dense_to_sparse_annealing_lowers_the_temperature_over_training_and_it_is_saved(tmp_path):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    from hf_arch.recipes.router_annealing import DenseToSparseAnnealing, dense_to_sparse_routers

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(hf_arch.MoEConfig(
        **TINY, moe_router="activation_dense_to_sparse", moe_router_temperature=4.0)).train()
    rows = torch.randint(3, 61, (16, 12), generator=torch.Generator().manual_seed(5))
    data = Dataset.from_dict({"input_ids": rows.tolist(), "labels": rows.tolist()})
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=8, per_device_train_batch_size=4,
                             learning_rate=3e-3, logging_steps=4, report_to=[], save_strategy="no", use_cpu=True)
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[DenseToSparseAnnealing(0.25)])
    trainer.train()
    logged = [e["moe/router_temperature"] for e in trainer.state.log_history if "moe/router_temperature" in e]
    assert len(logged) == 2 and 4.0 > logged[0] > logged[1] > 0.25
    assert all(float(r.temperature) == pytest.approx(0.25) for r in dense_to_sparse_routers(model))
    model.save_pretrained(tmp_path / "saved", remote_code=False)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    assert all(float(r.temperature) == pytest.approx(0.25) for r in dense_to_sparse_routers(reloaded))
    with pytest.raises(ValueError, match="end_temperature must be > 0"):
        DenseToSparseAnnealing(0.0)


# --- SqrtGate -------------------------------------------------------------------------------------------------------

def test_sqrt_gate_weights_square_to_one_and_keep_the_output_rms_across_granularity():
    for k in (1, 2, 4, 6):
        r = router(moe_router="sqrt_gate", num_experts_per_tok=k).eval()
        x = tokens(50)
        routing = r(x)
        torch.testing.assert_close(routing.weight.pow(2).view(50, k).sum(-1), torch.ones(50))
        soft = router(moe_router="softmax_topk", num_experts_per_tok=k).eval()(x)
        assert torch.equal(routing.expert_idx, soft.expert_idx)  # same choice as softmax top-k
        torch.testing.assert_close(routing.weight, soft.weight.sqrt())
    # independent unit-RMS expert outputs: the mixed output keeps RMS 1 whatever k (plain weights shrink as 1/sqrt(k))
    gen = torch.Generator().manual_seed(0)
    for k in (2, 8):
        w = torch.full((k,), 1.0 / k)
        outputs = torch.randn(20000, k, generator=gen)
        assert float((outputs * w.sqrt()).sum(-1).pow(2).mean().sqrt()) == pytest.approx(1.0, abs=0.03)
        assert float((outputs * w).sum(-1).pow(2).mean().sqrt()) == pytest.approx(1 / math.sqrt(k), abs=0.03)


# --- DynaMoE ----------------------------------------------------------------------------------------------------------

def test_threshold_rule_takes_the_fewest_experts_that_reach_the_probability():
    probs = torch.randn(300, 6, generator=torch.Generator().manual_seed(3)).mul(2).softmax(-1)
    for p, cap in itertools.product((0.3, 0.6, 0.9, 1.0), (1, 3, 6)):
        got = experts_per_token(probs, cap, "threshold", p)
        for n in range(300):
            ordered = probs[n].sort(descending=True).values
            need = next((i + 1 for i in range(6) if ordered[: i + 1].sum() >= p), 6)
            assert int(got[n]) == min(need, cap)


def test_complexity_rule_follows_the_routing_entropy():
    uniform, peaked = torch.full((1, 6), 1 / 6), torch.tensor([[0.999] + [0.0002] * 5])
    assert int(experts_per_token(uniform, 4, "complexity", 0.5)) == 4
    assert int(experts_per_token(peaked, 4, "complexity", 0.5)) == 1
    r = router(moe_router="dynamic_topk", moe_dynamic_k="complexity", num_experts_per_tok=4).eval()
    x = tokens(64) * 3
    routing, probs = r(x), r.compute_logits(x).softmax(-1)
    count = routing.selected_mask().sum(-1)
    entropy = -(probs * probs.log()).sum(-1) / math.log(6)
    assert torch.equal(count, (1 + torch.floor(3 * entropy + 0.5)).long().clamp(1, 4))
    # the chosen are each token's most probable, weights renormalised over them
    for n in range(64):
        chosen = routing.expert_idx[routing.token_idx == n]
        assert set(chosen.tolist()) == set(probs[n].topk(int(count[n])).indices.tolist())
        torch.testing.assert_close(routing.weight[routing.token_idx == n].sum(), torch.tensor(1.0))


@pytest.mark.parametrize("schedule, expected", [
    ("uniform", [4, 4, 4, 4, 4]),
    ("descending", [4, 3, 3, 2, 1]),  # 4 - 3t, rounded half up
    ("ascending", [1, 2, 3, 3, 4]),
    ("pyramid", [1, 3, 4, 3, 1]),
    ("wave", [1, 4, 1, 4, 1]),
])
def test_capacity_schedules_across_the_sparse_layers(schedule, expected):
    config = hf_arch.MoEConfig(**{**TINY, "num_hidden_layers": 6, "num_experts_per_tok": 4},
                               mlp_layer_types=["dense", "sparse", "sparse", "sparse", "sparse", "sparse"],
                               moe_capacity_schedule=schedule,
                               **({} if schedule == "uniform" else {"moe_capacity_min": 1}))
    assert [moe_layer_capacity(config, i) for i in range(5)] == expected
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    assert [layer.mlp.top_k for layer in model.model.layers[1:]] == expected
    assert [layer.mlp.router.top_k for layer in model.model.layers[1:]] == expected
    assert not hasattr(model.model.layers[0].mlp, "router")


def test_balance_loss_counts_each_layer_at_its_own_capacity():
    config = hf_arch.MoEConfig(**{**TINY, "num_hidden_layers": 3, "num_experts_per_tok": 3},
                               moe_capacity_schedule="descending", moe_capacity_min=1)
    logits = [torch.randn(2, 5, 6, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    for n, layer_logits in enumerate(logits):
        k = moe_layer_capacity(config, n)
        probs = layer_logits.softmax(-1)
        chosen = torch.zeros_like(probs).scatter_(-1, layer_logits.topk(k, -1).indices, 1.0)
        reference = 6 * ((chosen.sum((0, 1)) / chosen.sum()) * probs.mean((0, 1))).sum()
        torch.testing.assert_close(load_balance_loss([layer_logits], config, None, [n]), reference)


# --- every router in a model ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(ROUTERS))
def test_router_trains_decodes_like_the_full_forward_and_round_trips(name, tmp_path, model_checks):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(hf_arch.MoEConfig(**{**TINY, **ROUTERS[name]}))
    rows = torch.randint(3, 61, (8, 16), generator=torch.Generator().manual_seed(7))
    model_checks.trains(model, rows, steps=15)
    model_checks.decodes_like_the_full_forward(model, rows[:2, :12], prefix=5)
    model_checks.round_trips(model, rows[:2, :12], tmp_path)
