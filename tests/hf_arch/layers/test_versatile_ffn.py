"""The ``versatile`` channel mixer (issue 21 item 5, VersatileFFN): the width path is the chosen neuron groups of the
one FFN, the depth path the FFN applied again to its refinement, the difficulty gate picks one per token (hard
forward, straight-through gradient); a dense checkpoint loads key for key and starts as the dense model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

import hf_arch

SHAPE = dict(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, pad_token_id=0, eos_token_id=1, bos_token_id=2)


def model(seed=0, **options):
    torch.manual_seed(seed)
    config = hf_arch.HybridConfig(**SHAPE, channel_mixer_types=["versatile", "versatile"],
                                  mixer_options={"versatile": {"virtual_experts": 4, "top_k": 2, **options}})
    return AutoModelForCausalLM.from_config(config).eval()


def dense_ffn(layer, x):
    return layer.down_proj(F.silu(layer.gate_proj(x)) * layer.up_proj(x))


@torch.no_grad()
def test_width_path_sums_the_chosen_neuron_groups():
    layer = model().model.layers[0].mlp
    layer.router_temperature.fill_(0.7)
    x = torch.randn(10, 32, generator=torch.Generator().manual_seed(1))
    logits = x @ layer.router_weight.T
    expected = []
    for n in range(10):
        top, chosen = logits[n].topk(2)
        weights = 2 * (0.7 * top).softmax(-1)
        act = F.silu(layer.gate_proj(x[n])) * layer.up_proj(x[n])
        mixed = torch.zeros_like(act)
        for w, g in zip(weights, chosen):
            mixed[g * 12:(g + 1) * 12] = w * act[g * 12:(g + 1) * 12]
        expected.append(layer.down_proj(mixed))
    torch.testing.assert_close(layer.width_path(x), torch.stack(expected), rtol=1e-5, atol=1e-6)
    every = model(top_k=4).model.layers[0].mlp  # every group, τ = 0: the dense FFN
    torch.testing.assert_close(every.width_path(x), dense_ffn(every, x), rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_groups_split_any_width():
    layer = model(virtual_experts=5, top_k=1).model.layers[0].mlp  # 48 neurons: 10, 10, 10, 9, 9
    x = torch.randn(10, 32, generator=torch.Generator().manual_seed(1))
    chosen = (x @ layer.router_weight.T).argmax(-1)
    bounds = [0, 10, 20, 30, 39, 48]
    act = F.silu(layer.gate_proj(x)) * layer.up_proj(x)
    mask = torch.zeros_like(act)
    for n, g in enumerate(chosen.tolist()):
        mask[n, bounds[g]:bounds[g + 1]] = 1.0
    torch.testing.assert_close(layer.width_path(x), layer.down_proj(act * mask), rtol=1e-5, atol=1e-6)
    every = model(virtual_experts=5, top_k=5).model.layers[0].mlp  # every group: the dense FFN
    torch.testing.assert_close(every.width_path(x), dense_ffn(every, x), rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_depth_path_reapplies_the_same_ffn():
    layer = model(max_depth=3).model.layers[0].mlp
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(2))
    h = dense_ffn(layer, x)
    h = dense_ffn(layer, x + h)
    torch.testing.assert_close(layer.depth_path(x), dense_ffn(layer, x + h), rtol=1e-5, atol=1e-6)


def test_the_gate_picks_one_path_per_token_in_training_and_inference():
    layer = model().model.layers[0].mlp
    x = torch.randn(1, 40, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        layer.gate_weight.normal_(0, 1.0)
        layer.gate_bias.zero_()
        deep = layer.difficulty(x[0]) > 0.5
        assert 5 < int(deep.sum()) < 35
        expected = torch.where(deep[:, None], layer.depth_path(x[0]), layer.width_path(x[0]))
        torch.testing.assert_close(layer(x)[0], expected, rtol=1e-5, atol=1e-6)
        assert layer.last_depth_share == pytest.approx(float(deep.float().mean()))
    layer.train()
    out = layer(x)
    torch.testing.assert_close(out[0].detach(), expected, rtol=1e-5, atol=1e-6)
    out.pow(2).sum().backward()
    assert layer.gate_weight.grad.abs().sum() > 0  # straight through the hard choice
    # τ = 0 weighs the chosen groups equally: the router learns through τ first (as tempered_topk)
    assert layer.router_temperature.grad.abs() > 0


@torch.no_grad()
def test_a_dense_checkpoint_loads_key_for_key_and_starts_as_the_dense_model(tmp_path):
    torch.manual_seed(0)
    dense = AutoModelForCausalLM.from_config(hf_arch.HybridConfig(**SHAPE)).eval()
    dense.save_pretrained(tmp_path, remote_code=False)
    config = hf_arch.HybridConfig(**SHAPE, channel_mixer_types=["versatile", "versatile"],
                                  mixer_options={"versatile": {"virtual_experts": 4, "top_k": 4}})
    versatile = AutoModelForCausalLM.from_pretrained(tmp_path, config=config).eval()
    ids = torch.randint(3, 61, (2, 12), generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(versatile(ids).logits, dense(ids).logits, rtol=1e-5, atol=1e-5)
    assert versatile.model.layers[0].mlp.last_depth_share == 0.0  # gate bias -4: the width path


def test_trains_decodes_like_the_full_forward_and_round_trips(tmp_path, model_checks):
    m = model()
    with torch.no_grad():  # a gate that sends tokens down both paths
        for layer in m.model.layers:
            layer.mlp.gate_bias.zero_()
            layer.mlp.gate_weight.normal_(0, 1.0)
    rows = torch.randint(3, 61, (8, 16), generator=torch.Generator().manual_seed(5))
    model_checks.trains(m, rows)
    model_checks.decodes_like_the_full_forward(m, rows[:2, :12], prefix=5)
    model_checks.round_trips(m, rows[:2, :12], tmp_path)


@pytest.mark.parametrize("options, message", [
    ({"virtual_experts": 49, "top_k": 2}, "virtual_experts (49) is larger than intermediate_size (48)"),
    ({"top_k": 5}, "top_k (5) is larger than virtual_experts (4)"),
    ({"max_depth": 1}, "max_depth must be an integer >= 2"),
    ({"width": 2}, "unknown options ['width']"),
])
def test_bad_options_are_refused_by_name(options, message):
    config = hf_arch.HybridConfig(**SHAPE, channel_mixer_types=["versatile", "dense"],
                                  mixer_options={"versatile": {"virtual_experts": 4, **options}})
    with pytest.raises(ValueError) as err:
        AutoModelForCausalLM.from_config(config)
    assert message in str(err.value)
