"""Read-ME (issue 21 item 1): a partition routed by one pre-gate decoupled from the layers. With every expert active
it is the dense model; the pre-gate's distillation recovers the layers' target experts from the embeddings alone and
brings held-out loss closer to the source than the untrained pre-gate; the plan is known before the layers run and
is what the forward uses; decoding, generation and save/load hold; bad input is refused by name."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_arch
from hf_arch.cli import main
from hf_arch.conversion import MoERefactorOptions, max_abs_logit_diff, refactor_moe


def _ids(vocab: int, rows: int = 2, length: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (rows, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def stories(stories260k, assets):
    source = AutoModelForCausalLM.from_pretrained(stories260k, dtype=torch.float32).eval()
    text = (assets / "data" / "tinystories_2mib.txt").read_text(encoding="utf-8")
    tokenizer = AutoTokenizer.from_pretrained(stories260k)
    calibration = tokenizer(text[:60000], return_tensors="pt").input_ids[:, :8192].view(16, 512)
    held_out = tokenizer(text[-20000:], return_tensors="pt").input_ids[:, :2048].view(8, 256)
    return source, calibration, held_out


def test_every_expert_active_is_the_dense_model(stories):
    source, calibration, _ = stories
    target = refactor_moe(source, MoERefactorOptions(method="read_me", experts=4, top_k=4, pre_gate_steps=20),
                          calibration_ids=calibration)
    assert target.config.moe_router == "pre_gated" and target.model.pre_gate is not None
    assert all(not hasattr(layer.mlp.router, "weight") for layer in target.model.layers)  # one router, not L
    ids = _ids(source.config.vocab_size)
    assert max_abs_logit_diff(source, target, ids) < 1e-4


def test_pre_gate_distillation_recovers_the_targets_and_the_source_loss(stories):
    source, calibration, held_out = stories
    untrained = refactor_moe(source, MoERefactorOptions(method="read_me", experts=4, top_k=2, pre_gate_steps=0),
                             calibration_ids=calibration)
    fitted = refactor_moe(source, MoERefactorOptions(method="read_me", experts=4, top_k=2, pre_gate_steps=300),
                          calibration_ids=calibration)
    report = fitted.conversion_report["pre_gate_distillation"]
    assert [r["layer"] for r in report] == list(range(source.config.num_hidden_layers))
    assert all(r["recall_after"] > r["recall_before"] + 0.1 for r in report), report
    with torch.no_grad():
        losses = [m(held_out, labels=held_out).loss.item() for m in (source, untrained, fitted)]
    assert losses[0] < losses[2] < losses[1], losses


def _tiny(seed=0, **extra):
    torch.manual_seed(seed)
    config = hf_arch.MoEConfig(**{**dict(
        vocab_size=67, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, moe_router="pre_gated",
        moe_pre_gate_hidden=24, mlp_layer_types=["dense", "sparse", "sparse", "sparse"], pad_token_id=0,
        eos_token_id=1, bos_token_id=2), **extra})
    return AutoModelForCausalLM.from_config(config).eval()


@torch.no_grad()
def test_the_plan_is_known_before_the_layers_run_and_is_what_the_forward_uses():
    model = _tiny(moe_capacity_schedule="ascending", num_experts_per_tok=3)
    ids = _ids(67, rows=2, length=9)
    calls = []
    hooks = [layer.register_forward_hook(lambda *a: calls.append(1)) for layer in model.model.layers]
    plan = model.plan_experts(ids)
    assert calls == []  # from the embeddings alone
    for h in hooks:
        h.remove()
    assert sorted(plan) == [1, 2, 3]
    out = model(ids, output_router_logits=True)
    for logits, layer in zip(out.router_logits, (1, 2, 3)):
        k = model.model.layers[layer].mlp.top_k
        assert plan[layer].shape == (2, 9, k)
        assert torch.equal(logits.topk(k, dim=-1).indices, plan[layer])
    assert [model.model.layers[i].mlp.top_k for i in (1, 2, 3)] == [1, 2, 3]


def test_trains_decodes_like_the_full_forward_and_round_trips(tmp_path, model_checks):
    model = _tiny()
    rows = _ids(67, rows=8, length=16, seed=4)
    model.train()
    loss = model(rows, labels=rows).loss
    loss.backward()
    assert model.model.pre_gate.out.weight.grad.abs().sum() > 0  # the pre-gate learns through the routing
    model.zero_grad()
    model_checks.trains(model, rows)
    model_checks.decodes_like_the_full_forward(model, rows[:2, :12], prefix=5)
    model_checks.round_trips(model, rows[:2, :12], tmp_path)


def test_bad_input_is_refused_by_name(stories260k, assets, tmp_path, capsys):
    with pytest.raises(ValueError, match="routes with the pre-gate"):
        MoERefactorOptions(method="read_me", router="softmax_topk").validate(172)
    with pytest.raises(ValueError, match="pool \\(UniPool\\) does not apply"):
        MoERefactorOptions(method="read_me", experts=4, pool=True).validate(172)
    with pytest.raises(ValueError, match="pre_gate_hidden must be an integer >= 1"):
        MoERefactorOptions(method="read_me", experts=4, pre_gate_hidden=0).validate(172)
    with pytest.raises(ValueError, match="no previous-layer logits for moe_gating_residual"):
        _tiny(moe_gating_residual=True)
    plain = AutoModelForCausalLM.from_config(hf_arch.MoEConfig(
        vocab_size=67, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_experts=4, moe_intermediate_size=16))
    with pytest.raises(ValueError, match="plan_experts needs moe_router='pre_gated'"):
        plain.plan_experts(_ids(67))
    source = AutoModelForCausalLM.from_pretrained(stories260k, dtype=torch.float32)
    with pytest.raises(ValueError, match="need calibration tokens"):
        refactor_moe(source, MoERefactorOptions(method="read_me", experts=4))
    assert main(["convert", str(stories260k), str(tmp_path / "x"), "--to", "moe", "--method", "read_me",
                 "--experts", "4", "--router", "softmax_topk", "--calibration-file",
                 str(assets / "data" / "tinystories_2mib.txt")]) == 2
    assert "routes with the pre-gate" in capsys.readouterr().err and not (tmp_path / "x").exists()
