"""MoE routers are classes registered by name: the built-ins, and one a user adds from outside the package with
``hf_arch.register_moe_router`` (no hf-arch file edited) that the config accepts, the model builds, generate and
save/load run."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import hf_arch
from hf_arch.configuration import MOE_ROUTER_SPECS
from hf_arch.layers.moe_routers import MOE_ROUTERS, MoERouter, routing_probabilities, selected_mask

TINY = dict(vocab_size=53, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16)


def test_builtin_routers_are_registered_with_the_specs_the_config_validates():
    assert set(MOE_ROUTERS) == {"softmax_topk", "sigmoid_topk", "relu_rmsnorm", "norm_router", "tempered_topk",
                                "sinkhorn", "stochastic", "activation_dense_to_sparse", "sqrt_gate", "dynamic_topk",
                                "pre_gated"}
    for name, cls in MOE_ROUTERS.items():
        assert MOE_ROUTER_SPECS[name].options == cls.config_options
        assert MOE_ROUTER_SPECS[name].fixed_top_k == cls.fixed_top_k
        assert MOE_ROUTER_SPECS[name].caps_top_k == cls.caps_top_k
        assert MOE_ROUTER_SPECS[name].balance_loss == cls.balance_loss
        balance = {} if cls.balance_loss else {"moe_load_balance_coef": 0.0}
        router = MoERouter(hf_arch.MoEConfig(**TINY, moe_router=name, **balance), 4, False)
        assert type(router) is cls  # MoERouter(config, ...) builds the registered class


@pytest.fixture
def least_likely_router():
    """A router from "outside": the k least likely experts under a softmax (any rule would do)."""

    @hf_arch.register_moe_router("test_least_likely")
    class LeastLikelyRouter(hf_arch.TopKRouter):
        @staticmethod
        def activate(logits):
            return (-logits).softmax(dim=-1)

        @staticmethod
        def probabilities(logits):
            return (-logits).softmax(dim=-1)

    yield LeastLikelyRouter
    MOE_ROUTERS.pop("test_least_likely")
    MOE_ROUTER_SPECS.pop("test_least_likely")


@torch.no_grad()
def test_a_router_registered_from_outside_builds_generates_and_round_trips(least_likely_router, tmp_path):
    config = hf_arch.MoEConfig(**TINY, moe_router="test_least_likely")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    assert all(isinstance(layer.mlp.router, least_likely_router) for layer in model.model.layers)
    ids = torch.randint(0, TINY["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(2))
    out = model(ids, output_router_logits=True)
    logits = out.router_logits[0].reshape(-1, TINY["num_experts"])
    chosen = selected_mask(logits, "test_least_likely", 2)
    assert torch.equal(chosen, logits.argsort(-1)[:, :2].new_zeros(chosen.shape, dtype=torch.bool).scatter_(
        -1, logits.argsort(-1)[:, :2], True))  # the two smallest logits: the rule really runs
    torch.testing.assert_close(routing_probabilities(logits, "test_least_likely").sum(-1), torch.ones(18))
    cached = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert torch.equal(cached, model.generate(ids, max_new_tokens=5, do_sample=False, use_cache=False))
    model.save_pretrained(tmp_path, remote_code=False)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(reloaded(ids).logits, model(ids).logits)


def test_config_refuses_an_unknown_router_and_another_routers_options_by_name(least_likely_router):
    with pytest.raises(ValueError, match="moe_router must be one of"):
        hf_arch.MoEConfig(**TINY, moe_router="no_such_router")
    with pytest.raises(ValueError, match="moe_norm_router_scale"):  # NormRouter's option, not this router's
        hf_arch.MoEConfig(**TINY, moe_router="test_least_likely", moe_norm_router_scale=3.0)


def test_tempered_router_chooses_by_logits_and_weighs_by_its_temperature():
    torch.manual_seed(0)
    router = MoERouter(hf_arch.MoEConfig(**TINY, moe_router="tempered_topk"), 4, False)
    router.init_parameters(torch.nn.init)
    assert router.temperature.item() == 1.0  # from scratch: softmax over the chosen logits
    x = torch.randn(6, TINY["hidden_size"])
    logits = router.compute_logits(x)
    k = router.top_k
    routing = router(x)
    top = logits.topk(k, dim=-1)
    assert torch.equal(routing.expert_idx.view(6, k), top.indices)
    torch.testing.assert_close(routing.weight.view(6, k), top.values.softmax(-1))
    with torch.no_grad():
        router.temperature.zero_()  # what a partition conversion sets: equal weights, same choice
    routing = router(x)
    assert torch.equal(routing.expert_idx.view(6, k), top.indices)
    torch.testing.assert_close(routing.weight, torch.full_like(routing.weight, 1 / k))
    # The temperature learns from zero (the rows get gradient once it moves).
    (routing.weight.view(6, k)[:, 0] * torch.arange(6.0)).sum().backward()
    assert router.temperature.grad is not None and router.temperature.grad.abs() > 0
