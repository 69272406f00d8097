"""MoE refactorization: upcycling and an all-experts partition equal the dense source; splits cover every neuron;
options that do not fit the source fail clearly; `hf-arch convert --to moe` writes a loadable checkpoint."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from hf_arch.cli import main
from hf_arch.conversion import MoERefactorOptions, convert, max_abs_logit_diff, refactor_moe
from hf_arch.conversion.moe_refactor import (
    _balanced_assign,
    balanced_kmeans,
    neuron_activations,
    partition_groups_cover_all_neurons,
    moe_config_from,
    split_neurons,
)


def _ids(vocab: int, rows: int = 2, length: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (rows, length), generator=torch.Generator().manual_seed(seed))


def _assert_equal_function(source, target, vocab):
    """Exact math: float64 agrees to 1e-10; fp32 to a few ulps of the logits (summation order differs)."""
    ids = _ids(vocab)
    fp32 = max_abs_logit_diff(source, target, ids)
    scale = source(ids).logits.abs().max().item()
    assert fp32 <= 2e-6 * max(scale, 1.0), (fp32, scale)
    with torch.no_grad():
        fp64 = (source.double()(ids).logits - target.double()(ids).logits).abs().max().item()
    source.float(), target.float()
    assert fp64 <= 1e-10, fp64


def test_upcycled_experts_equal_the_dense_model(source_name, random_source, source_dims):
    source = random_source(source_name)
    if getattr(source.config, "mlp_bias", False):
        with pytest.raises(ValueError, match="mlp_bias"):
            refactor_moe(source, MoERefactorOptions(method="upcycle", experts=3, top_k=2))
        return
    if getattr(source.config, "hidden_activation", "silu") != "silu":  # Gemma's GELU-tanh FFN
        with pytest.raises(ValueError, match="SwiGLU"):
            refactor_moe(source, MoERefactorOptions(method="upcycle", experts=3, top_k=2))
        return
    # A random router, so tokens really spread over the (identical) experts with unequal weights.
    target = refactor_moe(source, MoERefactorOptions(method="upcycle", experts=3, top_k=2, router_std=0.5))
    assert target.config.model_type == "hfa_moe" and target.config.moe_intermediate_size == 64
    _assert_equal_function(source, target, source_dims["vocab_size"])


@pytest.mark.parametrize("split, shared, distill", [("random", 0, 0), ("cluster", 0, 0), ("cluster", 8, 0),
                                                    ("activation", 16, 0), ("activation", None, 50)])
def test_partition_with_every_expert_active_equals_the_dense_model(stories260k, split, shared, distill):
    """With the default router (tempered_topk: centroid rows, or rows fitted by router distillation) — not only a
    zero router — every expert active is the dense FFN."""
    source = AutoModelForCausalLM.from_pretrained(stories260k, dtype=torch.float32).eval()
    options = MoERefactorOptions(method="partition", experts=4, top_k=4, split=split, shared_neurons=shared,
                                 router_distill_steps=distill)
    calibration = _ids(source.config.vocab_size, rows=4, length=64, seed=3)
    target = refactor_moe(source, options, calibration_ids=calibration)
    config = target.config
    shared = 36 if shared is None else shared  # auto: about one expert's width, 172 / 5 rounded up to split evenly
    assert config.moe_intermediate_size == (172 - shared) // 4 and config.moe_routed_scale == 4.0
    assert config.num_shared_experts == (1 if shared else 0) and config.moe_router == "tempered_topk"
    router = target.model.layers[1].mlp.router
    assert router.weight.abs().min() > 0 and router.temperature.item() == 0.0  # informative rows, equal weights
    # Equal weights 1/E times the routed scale E: every neuron contributes exactly once.
    _assert_equal_function(source, target, source.config.vocab_size)


def test_partition_top2_keeps_attention_and_norms_and_slices_the_ffn(stories260k):
    source = AutoModelForCausalLM.from_pretrained(stories260k, dtype=torch.float32).eval()
    target = refactor_moe(source, MoERefactorOptions(method="partition", experts=4, top_k=2, split="cluster",
                                                     shared_neurons=0, router_distill_steps=0))
    src, dst = source.state_dict(), target.state_dict()
    for name, tensor in src.items():
        if ".mlp." not in name:
            assert torch.equal(dst[name], tensor), name
    # Each expert's rows are rows of the dense gate/up and columns of down, and the router starts at the centroids.
    layer, moe = source.model.layers[2].mlp, target.model.layers[2].mlp
    gate = layer.gate_proj.weight
    rows = {tuple(r.tolist()): i for i, r in enumerate(gate)}
    I = moe.experts.gate_up_proj.shape[1] // 2
    for e in range(4):
        ids = [rows[tuple(r.tolist())] for r in moe.experts.gate_up_proj[e, :I]]
        torch.testing.assert_close(moe.experts.gate_up_proj[e, I:], layer.up_proj.weight[ids], rtol=0, atol=0)
        torch.testing.assert_close(moe.experts.down_proj[e], layer.down_proj.weight[:, ids], rtol=0, atol=0)
        torch.testing.assert_close(moe.router.weight[e], gate[ids].mean(0))
    ids = _ids(source.config.vocab_size)
    assert 0 < max_abs_logit_diff(source, target, ids) < 100  # top-2 of 4 is an approximation, not a copy
    assert target.generate(ids[:, :4], max_new_tokens=4, do_sample=False).shape == (2, 8)


def test_splits_are_balanced_and_cover_every_neuron():
    gen = torch.Generator().manual_seed(0)
    features = torch.cat([torch.randn(12, 6, generator=gen) + 4 * torch.eye(6)[i % 3] for i in range(3)])
    groups = balanced_kmeans(features, 3)
    assert torch.bincount(groups).tolist() == [12, 12, 12]
    activations = torch.rand(50, 36, generator=gen)
    for split in ("random", "cluster", "activation"):
        options = MoERefactorOptions(experts=4, split=split, shared_neurons=4)
        shared, experts = split_neurons(features, options, activations, layer_seed=0)
        assert [g.numel() for g in experts] == [8] * 4 and shared.numel() == 4
        assert partition_groups_cover_all_neurons(shared, experts, 36)


def test_balanced_assignment_fills_every_group_and_prefers_high_affinity():
    gen = torch.Generator().manual_seed(5)
    affinity = torch.randn(40, 4, generator=gen)
    assignment = _balanced_assign(affinity, size=10)
    assert torch.bincount(assignment, minlength=4).tolist() == [10] * 4
    # Better than chance: the mean affinity of the chosen groups beats a random balanced assignment's by far.
    chosen = affinity.gather(1, assignment.unsqueeze(1)).mean()
    random = affinity.gather(1, torch.arange(40).remainder(4)[torch.randperm(40, generator=gen)].unsqueeze(1)).mean()
    assert chosen > random + 0.5
    # With no contention every row gets its favourite group.
    easy = torch.eye(4).repeat_interleave(10, dim=0) + 0.01 * torch.randn(40, 4, generator=gen)
    assert torch.equal(_balanced_assign(easy, size=10), torch.arange(4).repeat_interleave(10))


def test_partition_scales_the_chosen_experts_to_their_plain_sum_unless_told(stories260k):
    source = AutoModelForCausalLM.from_pretrained(stories260k, dtype=torch.float32).eval()
    assert moe_config_from(source.config, MoERefactorOptions(experts=4, top_k=2)).moe_routed_scale == 2.0
    assert moe_config_from(source.config, MoERefactorOptions(experts=4, top_k=2, routed_scale=2 / 4 * 4)) \
        .moe_routed_scale == 2.0
    assert moe_config_from(source.config, MoERefactorOptions(method="upcycle", experts=4)).moe_routed_scale == 1.0
    assert moe_config_from(source.config, MoERefactorOptions(experts=4, routed_scale=4.0)).moe_routed_scale == 4.0


@pytest.mark.parametrize("method", ["partition", "upcycle"])
def test_pooled_conversion_routes_exactly_like_the_per_layer_one(stories260k, method):
    source = AutoModelForCausalLM.from_pretrained(stories260k, dtype=torch.float32).eval()
    common = dict(method=method, experts=4, top_k=2, split="cluster", router_std=0.5 if method == "upcycle" else 0.0,
                  shared_neurons=0, router_distill_steps=0)
    per_layer = refactor_moe(source, MoERefactorOptions(**common))
    pooled = refactor_moe(source, MoERefactorOptions(**common, pool=True))
    config, layers = pooled.config, pooled.config.num_hidden_layers
    assert config.moe_expert_pool == "global" and config.moe_pool_size == 4 * layers and config.moe_router_bias
    assert pooled.model.expert_pool.gate_up_proj.shape[0] == 4 * layers
    assert all(layer.mlp.experts is None for layer in pooled.model.layers)
    ids = _ids(source.config.vocab_size)
    with torch.no_grad():
        expected = per_layer(ids).logits
        out = pooled(ids, output_router_logits=True)
    # Same experts, same weights: fp32 rounding only (the pooled softmax sums over more, vanishing, terms).
    torch.testing.assert_close(out.logits, expected, rtol=0, atol=2e-6 * expected.abs().max().item())
    for index, logits in enumerate(out.router_logits):  # every layer picks its own slice of the pool
        own = range(4 * index, 4 * index + 4)
        assert all(e in own for e in logits.reshape(-1, logits.shape[-1]).topk(2, dim=-1).indices.unique().tolist())

    # A small foreign bias opens the rest of the pool from the start.
    opened = refactor_moe(source, MoERefactorOptions(**common, pool=True, pool_foreign_bias=0.0))
    with torch.no_grad():
        logits = opened(ids, output_router_logits=True).router_logits[2]
    chosen = logits.reshape(-1, logits.shape[-1]).topk(2, dim=-1).indices
    assert ((chosen < 8) | (chosen >= 12)).any()


def test_shared_neurons_are_the_most_active(stories260k):
    source = AutoModelForCausalLM.from_pretrained(stories260k, dtype=torch.float32).eval()
    acts = neuron_activations(source, _ids(source.config.vocab_size, length=48, seed=4))
    assert len(acts) == 5 and acts[0].shape == (2 * 48, 172)
    frequency = (acts[1] > acts[1].mean(0, keepdim=True)).float().mean(0)
    shared, _ = split_neurons(source.model.layers[1].mlp.gate_proj.weight,
                              MoERefactorOptions(experts=4, split="cluster", shared_neurons=8), acts[1], 1)
    assert frequency[shared].min() >= frequency.sort(descending=True).values[7]


@pytest.mark.parametrize("options, message", [
    (dict(experts=200), "experts (200) is more than the FFN neurons to split (172"),
    (dict(experts=5, shared_neurons=0), "do not divide into 5 equal experts"),
    (dict(experts=4, top_k=5), "top_k (5) is larger than the routed experts (4)"),
    (dict(split="kmeans"), "split must be one of"),
    (dict(method="moefy"), "method must be one of"),
    (dict(shared_neurons=172), "shared_neurons (172) must be smaller"),
    (dict(method="upcycle", shared_neurons=4), "shared_neurons applies to method='partition' or 'read_me' only"),
    (dict(experts=4, split="activation"), "need calibration tokens"),
    (dict(experts=4, split="cluster", shared_neurons=0), "router_distill_steps=200 need calibration tokens"),
    (dict(router="sigmoid_topk"), "router must be one of"),
    (dict(router_init="random"), "router_init must be one of"),
    (dict(routed_scale=-1.0), "routed_scale must be a finite number >= 0"),
    (dict(pool=True, pool_foreign_bias=float("nan")), "pool_foreign_bias must be a finite number >= 0"),
])
def test_options_that_do_not_fit_the_source_fail_clearly(stories260k, options, message):
    source = AutoModelForCausalLM.from_pretrained(stories260k, dtype=torch.float32).eval()
    with pytest.raises(ValueError) as err:
        refactor_moe(source, MoERefactorOptions(**{"experts": 4, **options}))
    assert message in str(err.value)


def test_convert_api_and_cli_write_a_loadable_moe(stories260k, tmp_path, capsys):
    calibration = tmp_path / "calib.txt"
    calibration.write_text("Once upon a time there was a little girl named Lily. She liked to play. " * 30)
    out = tmp_path / "moe"
    result = convert(stories260k, out, to="moe", method="partition", experts=4, top_k=2, split="activation",
                     shared_neurons=4, calibration_file=calibration, calibration_tokens=256, router_distill_steps=20)
    record = json.loads((out / "hf_arch_conversion.json").read_text())
    assert record["options"]["split"] == "activation" and record["variant"] == "moe"
    assert result.max_abs_logit_diff is not None and result.max_abs_logit_diff > 0
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert type(loaded).__name__ == "MoEForCausalLM" and loaded.config.num_shared_experts == 1

    # Refused before anything is written: missing calibration, or an existing output dir.
    with pytest.raises(ValueError, match="needs calibration text"):
        convert(stories260k, tmp_path / "nocal", to="moe", split="activation", experts=4)
    assert not (tmp_path / "nocal").exists()
    with pytest.raises(FileExistsError):
        convert(stories260k, out, to="moe", experts=4)

    assert main(["convert", str(stories260k), str(tmp_path / "up"), "--to", "moe", "--method", "upcycle",
                 "--experts", "3", "--top-k", "1", "--zero-experts", "1", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["options"]["method"] == "upcycle" and printed["options"]["zero_experts"] == 1
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "up").config.moe_zero_experts == 1
    assert main(["convert", str(stories260k), str(tmp_path / "pool"), "--to", "moe", "--experts", "4",
                 "--shared-expert", "4", "--calibration-file", str(calibration), "--calibration-tokens", "256",
                 "--pool", "--routed-scale", "3"]) == 0
    pooled = AutoModelForCausalLM.from_pretrained(tmp_path / "pool").config
    assert pooled.moe_expert_pool == "global" and pooled.moe_routed_scale == 3.0 and pooled.num_shared_experts == 1


def test_router_distillation_picks_the_experts_that_carry_the_dense_output(stories260k, assets):
    """On TinyStories (the source's own domain), fitting the routers to the greedy targets raises how many target
    experts the top-2 of 4 recovers in every layer, and brings the converted model's next-token loss on held-out
    text closer to the source's than the centroid routers do."""
    from transformers import AutoTokenizer

    text = (assets / "data" / "tinystories_2mib.txt").read_text(encoding="utf-8")
    tokenizer = AutoTokenizer.from_pretrained(stories260k)
    calibration = tokenizer(text[:60000], return_tensors="pt").input_ids[:, :8192].view(16, 512)
    held_out = tokenizer(text[-20000:], return_tensors="pt").input_ids[:, :2048].view(8, 256)
    source = AutoModelForCausalLM.from_pretrained(stories260k, dtype=torch.float32).eval()
    common = dict(experts=4, top_k=2, split="activation")
    centroid = refactor_moe(source, MoERefactorOptions(**common, router_distill_steps=0), calibration_ids=calibration)
    fitted = refactor_moe(source, MoERefactorOptions(**common, router_distill_steps=150), calibration_ids=calibration)
    report = fitted.conversion_report["router_distillation"]
    assert len(report) == source.config.num_hidden_layers
    assert all(layer["recall_after"] > layer["recall_before"] for layer in report), report
    with torch.no_grad():
        losses = [model(held_out, labels=held_out).loss.item() for model in (source, centroid, fitted)]
    assert losses[0] < losses[2] < losses[1], losses
