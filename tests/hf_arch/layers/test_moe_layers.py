"""MoE layer pieces: each router against hand-computed values, zero/copy/constant experts, aux losses, statistics."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import initialization

from hf_arch import MoEConfig
from hf_arch.layers.moe import HfArchMoE
from hf_arch.layers.moe_losses import chunk_sparsity_loss, load_balance_loss, moe_auxiliary_losses
from hf_arch.layers.moe_router import MoERouter, Routing, routing_probabilities, selected_mask
from hf_arch.layers.moe_stats import RoutingStatsAccumulator

H = 4


def config(**overrides) -> MoEConfig:
    base = dict(vocab_size=32, hidden_size=H, intermediate_size=8, num_hidden_layers=2, num_attention_heads=2,
                num_experts=4, num_experts_per_tok=2, moe_intermediate_size=6)
    return MoEConfig(**{**base, **overrides})


def router(cfg, weight, gating_residual=False) -> MoERouter:
    r = MoERouter(cfg, weight.shape[0], gating_residual)
    r.init_parameters(initialization)
    with torch.no_grad():
        r.weight.copy_(weight)
    return r


X = [[1.0, 0.0, 2.0, -1.0], [0.5, -1.0, 0.0, 1.0], [-2.0, 1.0, 1.5, 0.0]]  # no ties among logits
W = [[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0], [0.5, 0.5, 0.5, 0.6]]


def hand_logits(xs=X, ws=W):
    return [[sum(a * b for a, b in zip(x, w)) for w in ws] for x in xs]


def hand_topk(scores, k):
    return [sorted(range(len(row)), key=lambda e: -row[e])[:k] for row in scores]


@pytest.mark.parametrize("normalise", [True, False])
def test_softmax_topk_matches_hand_computation(normalise):
    r = router(config(moe_norm_topk_prob=normalise), torch.tensor(W))
    out = r(torch.tensor(X))
    logits = hand_logits()
    probs = [[math.exp(v) / sum(math.exp(u) for u in row) for v in row] for row in logits]
    top = hand_topk(probs, 2)
    expect = []
    for row, chosen in zip(probs, top):
        picked = [row[e] for e in chosen]
        expect += [p / sum(picked) for p in picked] if normalise else picked
    assert out.token_idx.tolist() == [0, 0, 1, 1, 2, 2]
    assert out.expert_idx.tolist() == [e for chosen in top for e in chosen]
    torch.testing.assert_close(out.weight, torch.tensor(expect), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(out.logits, torch.tensor(logits))


def test_sigmoid_topk_matches_hand_computation():
    r = router(config(moe_router="sigmoid_topk", moe_norm_topk_prob=False), torch.tensor(W))
    out = r(torch.tensor(X))
    scores = [[1 / (1 + math.exp(-v)) for v in row] for row in hand_logits()]
    top = hand_topk(scores, 2)
    assert out.expert_idx.tolist() == [e for chosen in top for e in chosen]
    torch.testing.assert_close(out.weight, torch.tensor([row[e] for row, c in zip(scores, top) for e in c]))


def test_norm_router_is_scaled_cosine_similarity_and_scale_invariant():
    r = router(config(moe_router="norm_router", moe_norm_router_scale=3.0), torch.tensor(W))
    out = r(torch.tensor(X))
    cosine = [[sum(a * b for a, b in zip(x, w)) / (math.dist(x, [0] * H) * math.dist(w, [0] * H)) for w in W] for x in X]
    torch.testing.assert_close(out.logits, 3.0 * torch.tensor(cosine), rtol=1e-6, atol=1e-6)
    scaled = r(7.5 * torch.tensor(X))
    assert scaled.expert_idx.tolist() == out.expert_idx.tolist()
    torch.testing.assert_close(scaled.weight, out.weight)


def test_relu_rmsnorm_router_selects_every_positive_expert():
    cfg = config(moe_router="relu_rmsnorm")
    r = router(cfg, torch.tensor(W))
    with torch.no_grad():
        r.norm_weight.copy_(torch.tensor([1.0, 2.0, 0.5, 1.5]))
    xs = X + [[-1.0, -1.0, -1.0, -1.0]]  # every logit negative: the token uses no expert at all
    out = r(torch.tensor(xs))
    pairs, weights = [], []
    for n, row in enumerate(hand_logits(xs)):
        active = [max(v, 0.0) for v in row]
        rms = math.sqrt(sum(a * a for a in active) / len(active) + cfg.rms_norm_eps)
        for e, a in enumerate(active):
            if a > 0:
                pairs.append((n, e))
                weights.append(a / rms * [1.0, 2.0, 0.5, 1.5][e])
    assert list(zip(out.token_idx.tolist(), out.expert_idx.tolist())) == pairs
    assert {n for n, _ in pairs} == {0, 1, 2} and len(pairs) != 2 * 3  # variable count, token 3 routed nowhere
    torch.testing.assert_close(out.weight, torch.tensor(weights), rtol=1e-6, atol=1e-6)


def test_gating_residual_adds_projected_previous_logits():
    r = router(config(), torch.tensor(W), gating_residual=True)
    assert torch.count_nonzero(r.residual_proj.weight) == 0  # starts as the plain router
    G = torch.arange(16, dtype=torch.float32).view(4, 4) / 10
    with torch.no_grad():
        r.residual_proj.weight.copy_(G)
    previous = torch.tensor([[1.0, -1.0, 0.5, 0.0]] * 3)
    out = r(torch.tensor(X), previous)
    expect = [[l + sum(G[e, j].item() * previous[n, j].item() for j in range(4)) for e, l in enumerate(row)]
              for n, row in enumerate(hand_logits())]
    torch.testing.assert_close(out.logits, torch.tensor(expect), rtol=1e-6, atol=1e-6)


def test_router_bias_starts_at_zero_and_shifts_the_logits():
    r = router(config(moe_router_bias=True), torch.tensor(W))
    assert torch.count_nonzero(r.bias) == 0
    with torch.no_grad():
        r.bias.copy_(torch.tensor([0.0, -10.0, 0.0, 3.0]))
    out = r(torch.tensor(X))
    expect = [[l + b for l, b in zip(row, (0.0, -10.0, 0.0, 3.0))] for row in hand_logits()]
    torch.testing.assert_close(out.logits, torch.tensor(expect), rtol=1e-6, atol=1e-6)
    assert 1 not in out.expert_idx.tolist() and out.expert_idx.view(3, 2)[:, 0].tolist() == [3, 3, 3]
    assert router(config(), torch.tensor(W)).bias is None


@pytest.mark.parametrize("kind", ["softmax_topk", "sigmoid_topk", "norm_router"])
def test_ties_in_topk_pick_k_distinct_experts_with_equal_weights(kind):
    r = router(config(moe_router=kind, num_experts_per_tok=3), torch.tensor(W))
    out = r(torch.zeros(2, H))  # all logits equal (cosine of a zero vector is 0 too)
    chosen = out.expert_idx.view(2, 3)
    assert all(len(set(row.tolist())) == 3 for row in chosen)
    torch.testing.assert_close(out.weight, torch.full((6,), 1 / 3))
    assert selected_mask(out.logits, kind, 3).sum(-1).tolist() == [3, 3]


def test_routing_probabilities_rows_sum_to_one():
    logits = torch.randn(5, 6)
    for kind in ("softmax_topk", "sigmoid_topk", "relu_rmsnorm", "norm_router"):
        torch.testing.assert_close(routing_probabilities(logits.abs() + 0.1, kind).sum(-1), torch.ones(5))


# -- the layer -----------------------------------------------------------------------------------------------------

def moe_layer(**overrides) -> HfArchMoE:
    cfg = config(mlp_layer_types=["sparse", "sparse"], **overrides)
    torch.manual_seed(0)
    layer = HfArchMoE(cfg, 0)
    for module in layer.modules():
        if hasattr(module, "init_parameters"):
            module.init_parameters(initialization)
    for module in layer.modules():
        if isinstance(module, torch.nn.Linear):
            torch.nn.init.normal_(module.weight, std=0.5)
    return layer


def swiglu(x, gate_up, down):
    gate, up = (x @ gate_up.T).chunk(2, dim=-1)
    return (F.silu(gate) * up) @ down.T


def test_zero_copy_constant_and_ffn_experts_do_what_moe_plus_plus_says(monkeypatch):
    layer = moe_layer(num_experts=2, moe_zero_experts=1, moe_copy_experts=1, moe_constant_experts=2)
    x = torch.randn(1, 5, H)
    flat = x[0]
    # ids: FFN 0,1; zero 2; copy 3; constant 4,5.
    fixed = Routing(torch.zeros(5, 6), torch.tensor([0, 0, 1, 2, 3, 4]), torch.tensor([1, 3, 2, 3, 4, 5]),
                    torch.tensor([0.6, 0.4, 0.7, 0.3, 0.9, 0.2]))
    monkeypatch.setattr(layer.router, "forward", lambda *a, **k: fixed)
    out, _ = layer(x)
    e = layer.experts
    zc = layer.zero_computation

    def constant(j, v):
        a = zc.constant_mix(v).view(2, 2)[j].softmax(-1)
        return a[0] * v + a[1] * zc.constant_vectors[j]

    expect = torch.stack([
        0.6 * swiglu(flat[0], e.gate_up_proj[1], e.down_proj[1]) + 0.4 * flat[0],  # FFN 1 + copy
        torch.zeros(H),                                                          # zero expert only
        0.3 * flat[2],                                                           # copy only
        0.9 * constant(0, flat[3]),
        0.2 * constant(1, flat[4]),
    ])
    torch.testing.assert_close(out[0], expect, rtol=1e-5, atol=1e-6)


def test_expert_that_receives_no_tokens_gets_zero_gradient(monkeypatch):
    layer = moe_layer(num_experts=3, num_experts_per_tok=1)
    fixed = Routing(torch.zeros(4, 3), torch.arange(4), torch.tensor([0, 2, 0, 2]), torch.ones(4))
    monkeypatch.setattr(layer.router, "forward", lambda *a, **k: fixed)
    out, _ = layer(torch.randn(1, 4, H))
    out.square().sum().backward()
    assert torch.count_nonzero(layer.experts.gate_up_proj.grad[1]) == 0
    assert torch.count_nonzero(layer.experts.down_proj.grad[1]) == 0
    assert torch.count_nonzero(layer.experts.gate_up_proj.grad[0]) > 0


def test_shared_expert_with_sigmoid_gate_is_added_to_routed_output():
    layer = moe_layer(num_shared_experts=1, shared_expert_intermediate_size=5, shared_expert_gate=True)
    x = torch.randn(2, 3, H)
    out, _ = layer(x)
    shared = torch.sigmoid(layer.shared_expert_gate(x)) * layer.shared_expert(x)
    layer.shared_expert = None
    routed, _ = layer(x)
    torch.testing.assert_close(out, routed + shared)


def test_layer_output_equals_naive_sum_over_assignments():
    layer = moe_layer(num_experts=4, num_experts_per_tok=2)
    x = torch.randn(2, 5, H)
    out, logits = layer(x)
    flat = x.reshape(-1, H)
    routing = layer.router(flat)
    expect = torch.zeros_like(flat)
    for n, e, w in zip(routing.token_idx.tolist(), routing.expert_idx.tolist(), routing.weight):
        expect[n] += w * swiglu(flat[n], layer.experts.gate_up_proj[e], layer.experts.down_proj[e])
    torch.testing.assert_close(out.reshape(-1, H), expect, rtol=1e-5, atol=1e-6)
    assert logits.shape == (2, 5, 4) and logits.dtype == torch.float32


# -- auxiliary losses ----------------------------------------------------------------------------------------------

def test_load_balance_is_one_when_uniform_and_E_when_collapsed():
    cfg = config()
    uniform = torch.zeros(1, 8, 4)
    uniform[0, torch.arange(8), torch.arange(8) % 4] = 1e-3  # tiny tie-break: each expert chosen equally often
    assert load_balance_loss([uniform], cfg).item() == pytest.approx(1.0, abs=1e-3)
    collapsed = torch.tensor([20.0, 19.0, -20.0, -20.0]).expand(1, 8, 4)
    # top-2 always {0, 1}: f = [.5, .5, 0, 0], P ≈ [.73, .27, 0, 0] → 4·(.5·.73 + .5·.27) = 2.
    assert load_balance_loss([collapsed], cfg).item() == pytest.approx(2.0, abs=1e-3)


def test_pool_scope_balances_the_union_of_layers():
    cfg = config(moe_expert_pool="global", moe_pool_size=4, moe_load_balance_scope="pool")
    a = torch.tensor([9.0, 9.0, -9.0, -9.0]).expand(1, 4, 4)
    b = torch.tensor([-9.0, -9.0, 9.0, 9.0]).expand(1, 4, 4)
    # Each layer alone is unbalanced (loss 2), the pool as a whole is balanced (loss 1).
    assert load_balance_loss([a], cfg).item() == pytest.approx(2.0, abs=1e-3)
    assert load_balance_loss([a, b], cfg).item() == pytest.approx(1.0, abs=1e-3)


def test_padding_is_left_out_of_the_losses():
    cfg = config(moe_z_loss_coef=0.1)
    logits = torch.randn(2, 6, 4)
    mask = torch.tensor([[1] * 6, [0, 0, 0, 1, 1, 1]])
    total, terms = moe_auxiliary_losses([logits], cfg, mask)
    junk = logits.clone()
    junk[1, :3] = 50.0  # whatever the padded positions hold
    total2, _ = moe_auxiliary_losses([junk], cfg, mask)
    torch.testing.assert_close(total, total2)
    assert set(terms) == {"load_balance", "z_loss"}


def test_chunk_sparsity_loss_is_union_probability():
    a = torch.zeros(1, 4, 2)
    a[0, 0, 0], a[0, 1, 0], a[0, 2, 1] = 0.5, 1.0, 2.0
    p = torch.tanh(a)
    chunk0 = 1 - (1 - p[0, :2]).prod(0)  # tokens 0-1
    chunk1 = 1 - (1 - p[0, 2:]).prod(0)
    expect = (chunk0.mean() + chunk1.mean()) / 2
    torch.testing.assert_close(chunk_sparsity_loss(a, 2), expect)


def _train_router(layer, x, loss_fn, steps=60, lr=0.05) -> None:
    optimizer = torch.optim.Adam(layer.router.parameters(), lr=lr)
    for _ in range(steps):
        _, logits = layer(x)
        loss = loss_fn(logits)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def test_load_balance_loss_rebalances_a_skewed_router():
    wide = dict(hidden_size=16, num_experts=4, num_experts_per_tok=1)
    layer = moe_layer(**wide)
    cfg = config(mlp_layer_types=["sparse", "sparse"], **wide)
    g = torch.Generator().manual_seed(1)
    u = F.normalize(torch.randn(16, generator=g), dim=0)
    x = 2 * u + torch.randn(4, 16, 16, generator=g)
    with torch.no_grad():
        layer.router.weight.copy_(0.1 * torch.randn(4, 16, generator=g))
        layer.router.weight[0] += 4 * u  # expert 0 wins for (nearly) every token

    def max_load():
        with torch.no_grad():
            _, logits = layer(x)
        counts = selected_mask(logits, "softmax_topk", 1).sum(dim=(0, 1)).float()
        return (counts.max() / counts.mean()).item()

    before = max_load()
    _train_router(layer, x, lambda logits: load_balance_loss([logits], cfg))
    after = max_load()
    assert before > 3.5  # 4.0 = every token on one expert
    assert after < 1.5, (before, after)


def test_blockffn_sparsity_losses_reduce_active_experts():
    layer = moe_layer(moe_router="relu_rmsnorm", num_experts=8)
    cfg = config(mlp_layer_types=["sparse", "sparse"], moe_router="relu_rmsnorm", num_experts=8,
                 moe_tls_coef=1.0, moe_cls_coef=1.0)
    g = torch.Generator().manual_seed(2)
    # Hidden states share a common direction (as real ones do); without it no bias-free router could switch off
    # an expert for both x and -x.
    x = 2 * F.normalize(torch.randn(H, generator=g), dim=0) + torch.randn(4, 16, H, generator=g)

    def active():
        with torch.no_grad():
            _, logits = layer(x)
        return (logits > 0).float().sum(-1).mean().item()

    before = active()
    _train_router(layer, x, lambda logits: moe_auxiliary_losses([logits], cfg)[0], steps=40, lr=0.02)
    after = active()
    assert after < 0.6 * before, (before, after)


# -- statistics ----------------------------------------------------------------------------------------------------

def test_routing_stats_count_what_the_router_chose():
    stats = RoutingStatsAccumulator(num_ffn=3, num_zero=1, num_copy=1, num_constant=0, chunk_size=2)
    selected = torch.zeros(1, 4, 5, dtype=torch.bool)
    selected[0, 0, [0, 1]] = True  # two FFN experts
    selected[0, 1, [0, 3]] = True  # FFN 0 + zero expert
    selected[0, 2, [2, 4]] = True  # FFN 2 + copy
    selected[0, 3, [3]] = True     # padding below: ignored
    stats.add(0, selected, torch.tensor([[1, 1, 1, 0]]))
    summary = stats.summary()
    assert summary["moe/active_experts_per_token"] == pytest.approx(4 / 3)
    assert summary["moe/zero_computation_share"] == pytest.approx(2 / 6)
    assert summary["moe/zero_expert_share"] == pytest.approx(1 / 6)
    assert summary["moe/token_level_sparsity"] == pytest.approx(1 - 4 / 9)
    # One whole real chunk (tokens 0-1) uses FFN {0, 1} of 3; chunk 2-3 holds padding and is skipped.
    assert summary["moe/chunk_level_sparsity_2"] == pytest.approx(1 - 2 / 3)
    assert stats.per_layer_load()[0] == pytest.approx([2 / 6, 1 / 6, 1 / 6, 1 / 6, 1 / 6])


@pytest.mark.parametrize("kind", ["softmax_topk", "relu_rmsnorm"])
@pytest.mark.parametrize("zero_computation", [False, True], ids=["ffn_only", "moe_plus_plus"])
def test_layer_traces_as_one_static_graph_with_eager_outputs_and_gradients(kind, zero_computation):
    """Under graph capture the layer swaps data-dependent selections for masks and runs the grouped experts as one
    opaque op (forward and backward): a fullgraph trace gives the eager output and parameter gradients."""
    extra = dict(moe_zero_experts=1, moe_copy_experts=1, moe_constant_experts=2) if zero_computation else {}
    layer = moe_layer(moe_router=kind, **extra)
    x = torch.randn(2, 7, H, generator=torch.Generator().manual_seed(4))

    def run(fn):
        layer.zero_grad()
        out, logits = fn(x)
        (out.square().sum() + logits.sum()).backward()
        return out.detach(), {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}

    eager_out, eager_grads = run(layer)
    torch._dynamo.reset()
    traced_out, traced_grads = run(torch.compile(layer, fullgraph=True, backend="aot_eager"))
    torch.testing.assert_close(traced_out, eager_out, rtol=1e-5, atol=1e-6)
    assert traced_grads.keys() == eager_grads.keys()
    for name, grad in eager_grads.items():
        torch.testing.assert_close(traced_grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)
