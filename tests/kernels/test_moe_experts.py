"""Grouped expert MLP, PyTorch path: ``sort_by_expert`` and ``grouped_expert_mlp`` against the masked-loop reference.

The reference runs in float64 on the same inputs; every case compares the output and the gradients of x, gate_up
and down under a random upstream gradient, over routings that stress the grouping: balanced top-2, everything on one
expert, an expert with no assignments (its gradients must be exactly zero), no assignments at all, a single token,
and repeated (token, expert) pairs.
"""

from __future__ import annotations

import pytest
import torch

from hf_arch.kernels.moe.grouped import grouped_expert_mlp
from hf_arch.kernels.moe.naive import naive_expert_mlp
from hf_arch.kernels.moe.permute import sort_by_expert

GRADS = ("x", "gate_up", "down")


def rel_rms(ref: torch.Tensor, got: torch.Tensor) -> float:
    """||ref - got|| / ||ref|| in float64 (0 when both are exactly equal, e.g. empty); a NaN fails outright."""
    assert not torch.isnan(got).any(), "NaN in result"
    ref, got = ref.double(), got.double()
    diff = (ref - got).norm().item()
    return 0.0 if diff == 0.0 else diff / max(ref.norm().item(), 1e-30)


def routing(kind: str, N: int, E: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(token_idx, expert_idx) for one routing pattern."""
    if kind == "balanced":  # top-2 over distinct experts, as a router produces
        experts = torch.rand(N, E, generator=gen).topk(2, -1).indices
        return torch.arange(N).repeat_interleave(2), experts.reshape(-1)
    if kind == "skewed":  # every assignment on one expert
        return torch.arange(N).repeat_interleave(2), torch.full((2 * N,), E // 2)
    if kind == "unused-expert":  # the last expert gets nothing
        experts = torch.rand(N, E - 1, generator=gen).topk(2, -1).indices
        return torch.arange(N).repeat_interleave(2), experts.reshape(-1)
    if kind == "empty":
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    if kind == "duplicates":  # the same (token, expert) pair several times, unsorted token order
        token_idx = torch.tensor([3, 0, 3, 3, 1, 0, 2, 3] + list(range(N)))
        expert_idx = torch.tensor([1, 2, 1, 1, 0, 2, 1, 0] + [1] * N)
        return token_idx, expert_idx
    raise ValueError(kind)


def make_inputs(kind="balanced", N=24, H=40, I=24, E=5, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    token_idx, expert_idx = routing(kind, N, E, gen)
    x = torch.randn(N, H, generator=gen)
    gate_up = torch.randn(E, 2 * I, H, generator=gen) * H**-0.5
    down = torch.randn(E, H, I, generator=gen) * I**-0.5
    return dict(x=x.to(dtype), token_idx=token_idx, expert_idx=expert_idx, gate_up=gate_up.to(dtype),
                down=down.to(dtype))


def run_with_grads(fn, inputs, dy=None, seed=1):
    """Output and gradients of (y * dy).sum(); dy random in x's dtype unless given."""
    leaves = {n: inputs[n].detach().clone().requires_grad_(True) for n in GRADS}
    y = fn(leaves["x"], inputs["token_idx"], inputs["expert_idx"], leaves["gate_up"], leaves["down"])
    if dy is None:
        dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed)).to(y.dtype)
    (y * dy.to(y.dtype)).sum().backward()
    return y.detach(), {n: t.grad for n, t in leaves.items()}, dy


def compare(fn, inputs, tol):
    """fn vs the float64 reference on the same inputs and upstream gradient."""
    y, grads, dy = run_with_grads(fn, inputs)
    ref_inputs = {n: (t.double() if t.is_floating_point() else t) for n, t in inputs.items()}
    y_ref, g_ref, _ = run_with_grads(naive_expert_mlp, ref_inputs, dy=dy.double())
    assert y.dtype == inputs["x"].dtype
    assert y.shape == y_ref.shape == (inputs["token_idx"].numel(), inputs["x"].shape[1])
    err = rel_rms(y_ref, y)
    assert err <= tol, f"y: relative RMS error {err:.3e} > {tol:.1e}"
    for name in GRADS:
        assert grads[name] is not None and grads[name].dtype == inputs[name].dtype, name
        assert grads[name].shape == inputs[name].shape, name
        err = rel_rms(g_ref[name], grads[name])
        assert err <= tol, f"d{name}: relative RMS error {err:.3e} > {tol:.1e}"
    return y, grads


def test_sort_by_expert_is_stable_with_counts_and_offsets():
    expert_idx = torch.tensor([2, 0, 2, 3, 0, 2, 0])
    order, counts, offsets = sort_by_expert(expert_idx, 5)
    assert order.tolist() == [1, 4, 6, 0, 2, 5, 3]  # ties keep their original order
    assert counts.tolist() == [3, 0, 3, 1, 0]
    assert offsets.tolist() == [0, 3, 3, 6, 7, 7]
    assert order.dtype == counts.dtype == offsets.dtype == torch.long


def test_sort_by_expert_random_and_empty():
    gen = torch.Generator().manual_seed(0)
    expert_idx = torch.randint(0, 7, (200,), generator=gen)
    order, counts, offsets = sort_by_expert(expert_idx, 9)
    sorted_e = expert_idx[order]
    assert (sorted_e[1:] >= sorted_e[:-1]).all()
    for e in range(9):
        seg = order[offsets[e] : offsets[e + 1]]
        assert (expert_idx[seg] == e).all() and seg.numel() == counts[e]
        assert (seg[1:] > seg[:-1]).all()  # stable: increasing original positions within an expert
    assert offsets[-1] == 200 and counts[7:].sum() == 0

    order, counts, offsets = sort_by_expert(torch.zeros(0, dtype=torch.long), 3)
    assert order.numel() == 0 and counts.tolist() == [0, 0, 0] and offsets.tolist() == [0, 0, 0, 0]


def test_naive_matches_dense_formula():
    """The reference itself, against the contract written out for one assignment at a time."""
    inp = make_inputs("duplicates", N=6, H=8, I=4, E=3)
    y = naive_expert_mlp(**inp)
    for a, (t, e) in enumerate(zip(inp["token_idx"].tolist(), inp["expert_idx"].tolist())):
        gate, up = (inp["gate_up"][e] @ inp["x"][t]).chunk(2)
        torch.testing.assert_close(y[a], inp["down"][e] @ (torch.nn.functional.silu(gate) * up))


CASES = {
    "balanced-odd-H40-I24": dict(kind="balanced"),
    "balanced-aligned-H64-I32": dict(kind="balanced", N=32, H=64, I=32, E=4, seed=1),
    "skewed": dict(kind="skewed", seed=2),
    "duplicates": dict(kind="duplicates", N=6, seed=3),
    "single-token": dict(kind="balanced", N=1, E=3, seed=4),
    "many-experts": dict(kind="balanced", N=16, E=12, seed=5),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_grouped_matches_naive(case):
    compare(grouped_expert_mlp, make_inputs(**case), 1e-5)


def test_unused_expert_gets_exactly_zero_grads():
    inp = make_inputs("unused-expert", seed=6)
    _, grads = compare(grouped_expert_mlp, inp, 1e-5)
    assert (grads["gate_up"][-1] == 0).all() and (grads["down"][-1] == 0).all()
    assert grads["gate_up"][:-1].abs().sum() > 0


def test_no_assignments():
    inp = make_inputs("empty", seed=7)
    y, grads = compare(grouped_expert_mlp, inp, 0.0)
    assert y.shape == (0, inp["x"].shape[1])
    for name in GRADS:
        assert (grads[name] == 0).all(), name


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(dtype):
    compare(grouped_expert_mlp, make_inputs("balanced", dtype=dtype, seed=8), 5e-3 if dtype == torch.float16 else 2e-2)
