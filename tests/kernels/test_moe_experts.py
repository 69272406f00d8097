"""Expert MLP over routed assignments: ``sort_by_expert``, the PyTorch paths (``grouped_expert_mlp`` per assignment,
``grouped_weighted_expert_mlp`` with the routing weights and the scatter to tokens fused) and the Triton kernels, all
against the masked-loop reference.

The reference runs in float64 on the same inputs; every case compares the output and the gradients of x, gate_up
and down under a random upstream gradient, over routings that stress the grouping: balanced top-2, everything on one
expert, an expert with no assignments (its gradients must be exactly zero), no assignments at all, a single token,
and repeated (token, expert) pairs.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from hf_arch.kernels import ops
from hf_arch.kernels.buffers import new_buffer
from hf_arch.kernels.moe.grouped import grouped_expert_mlp
from hf_arch.kernels.moe.naive import naive_expert_mlp
from hf_arch.kernels.moe.permute import sort_by_expert
from hf_arch.kernels.moe.weighted import grouped_weighted_expert_mlp

GRADS = ("x", "gate_up", "down")
HAS_TRITON = importlib.util.find_spec("triton") is not None
requires_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")


def triton_grouped_expert_mlp(*args, **kwargs):
    from hf_arch.kernels.moe.triton_moe import triton_grouped_expert_mlp as kernel

    return kernel(*args, **kwargs)


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



# -- routing weights and the scatter to tokens fused in --------------------------------------------------------------

def naive_weighted(x, token_idx, expert_idx, weight, gate_up, down):
    y = naive_expert_mlp(x, token_idx, expert_idx, gate_up, down)
    return torch.zeros_like(x).index_add_(0, token_idx, y * weight[:, None].to(y.dtype))


def compare_weighted(fn, inputs, tol, seed=3):
    """``fn`` vs the float64 reference: the output [N, H] and the gradients of x, weight, gate_up and down."""
    gen = torch.Generator().manual_seed(seed)
    inputs = dict(inputs, weight=torch.rand(inputs["token_idx"].shape, generator=gen))
    names = ("x", "weight", "gate_up", "down")
    dout = torch.randn(inputs["x"].shape, generator=gen)

    def run(f, tensors):
        leaves = {n: tensors[n].detach().clone().requires_grad_(True) for n in names}
        out = f(leaves["x"], tensors["token_idx"], tensors["expert_idx"], leaves["weight"], leaves["gate_up"],
                leaves["down"])
        (out * dout.to(out.dtype)).sum().backward()
        return out.detach(), {n: leaves[n].grad for n in names}

    out, grads = run(fn, inputs)
    ref_out, ref_grads = run(naive_weighted, {n: (t.double() if t.is_floating_point() else t) for n, t in inputs.items()})
    assert out.shape == inputs["x"].shape and out.dtype == inputs["x"].dtype
    assert rel_rms(ref_out, out) <= tol, f"out: {rel_rms(ref_out, out):.3e}"
    for name in names:
        assert grads[name].dtype == inputs[name].dtype and grads[name].shape == inputs[name].shape, name
        assert rel_rms(ref_grads[name], grads[name]) <= tol, f"d{name}: {rel_rms(ref_grads[name], grads[name]):.3e}"
    return out, grads


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_weighted_matches_naive(case):
    compare_weighted(grouped_weighted_expert_mlp, make_inputs(**case), 1e-5)


def test_weighted_unused_expert_and_no_assignments():
    _, grads = compare_weighted(grouped_weighted_expert_mlp, make_inputs("unused-expert", seed=6), 1e-5)
    assert (grads["gate_up"][-1] == 0).all() and (grads["down"][-1] == 0).all()
    out, grads = compare_weighted(grouped_weighted_expert_mlp, make_inputs("empty", seed=7), 0.0)
    assert (out == 0).all() and all((g == 0).all() for g in grads.values())


def test_weighted_half_precision_and_shape_check():
    compare_weighted(grouped_weighted_expert_mlp, make_inputs("balanced", dtype=torch.float16, seed=8), 5e-3)
    inp = make_inputs("balanced", seed=9)
    with pytest.raises(ValueError, match="must be equal 1-D shapes"):
        grouped_weighted_expert_mlp(inp["x"], inp["token_idx"], inp["expert_idx"], torch.ones(3), inp["gate_up"],
                                    inp["down"])


@requires_triton
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_weighted_op_backends_match_naive(backend):
    def fn(x, t, e, w, gu, dn):
        return ops.weighted_expert_mlp(x, t, e, w, gu, dn, backend=backend)

    compare_weighted(fn, make_inputs("balanced", N=16, H=40, I=24, E=4, seed=13), 1e-5)


# -- Triton (through the interpreter on CPU: tiny shapes only) -------------------------------------------------------
# With the interpreter's blocks (BM=16, BN=BK=32) the shapes below cover several row blocks per expert with a partial
# last one, H and I not multiples of the blocks (H=40, I=24), more than one output block (H=64), and weight-gradient
# programs that loop over several row chunks.

def test_poisoned_buffers_are_on():
    """The comparisons below only catch unwritten elements if new buffers start as NaN."""
    assert torch.isnan(new_buffer(3, dtype=torch.float32, device=torch.device("cpu"))).all()


TRITON_CASES = {
    # fp32: tight. Odd sizes are masked in every kernel; the skewed case puts 3 row blocks (last partial) on one expert.
    "fp32-balanced-odd-H40-I24": (dict(kind="balanced"), 1e-5),
    "fp32-balanced-aligned-H64-I32": (dict(kind="balanced", N=32, H=64, I=32, E=4, seed=1), 1e-5),
    "fp32-skewed": (dict(kind="skewed", seed=2), 1e-5),
    "fp32-duplicates": (dict(kind="duplicates", N=6, seed=3), 1e-5),
    "fp32-single-token": (dict(kind="balanced", N=1, E=3, seed=4), 1e-5),
    "fp32-many-experts": (dict(kind="balanced", N=16, E=12, seed=5), 1e-5),
    # 16-bit: intermediates are stored in the input dtype, accumulation is fp32.
    "fp16-balanced-odd": (dict(kind="balanced", dtype=torch.float16, seed=6), 5e-3),
    "fp16-skewed-aligned": (dict(kind="skewed", N=20, H=32, I=16, E=3, dtype=torch.float16, seed=7), 5e-3),
    "bf16-balanced": (dict(kind="balanced", N=12, H=24, I=20, E=4, dtype=torch.bfloat16, seed=8), 3e-2),
}


@requires_triton
@pytest.mark.parametrize("case", TRITON_CASES.values(), ids=TRITON_CASES.keys())
def test_triton_matches_naive(case):
    shape, tol = case
    compare(triton_grouped_expert_mlp, make_inputs(**shape), tol)


@requires_triton
def test_triton_unused_expert_gets_exactly_zero_grads():
    inp = make_inputs("unused-expert", seed=9)
    _, grads = compare(triton_grouped_expert_mlp, inp, 1e-5)
    assert (grads["gate_up"][-1] == 0).all() and (grads["down"][-1] == 0).all()
    assert (grads["gate_up"][:-1] != 0).any() and (grads["down"][:-1] != 0).any()


@requires_triton
def test_triton_no_assignments():
    inp = make_inputs("empty", seed=10)
    y, grads = compare(triton_grouped_expert_mlp, inp, 0.0)
    assert y.shape == (0, inp["x"].shape[1])
    for name in GRADS:
        assert (grads[name] == 0).all(), name


@requires_triton
def test_triton_forward_without_grad_matches():
    """Without autograd the forward skips storing the pre-activation; the output is the same."""
    inp = make_inputs("balanced", seed=11)
    with torch.no_grad():
        y = triton_grouped_expert_mlp(**inp)
    torch.testing.assert_close(y, naive_expert_mlp(**inp), rtol=1e-5, atol=1e-5)


@requires_triton
def test_triton_fp32_weights_with_half_activations():
    """Weights are cast to x's dtype; their gradients come back in the weights' own dtype."""
    inp = make_inputs("balanced", N=8, H=32, I=16, E=3, seed=12)
    x = inp["x"].half().requires_grad_(True)
    gate_up, down = inp["gate_up"].requires_grad_(True), inp["down"].requires_grad_(True)
    y = triton_grouped_expert_mlp(x, inp["token_idx"], inp["expert_idx"], gate_up, down)
    y.float().pow(2).sum().backward()
    assert y.dtype == torch.float16 and gate_up.grad.dtype == down.grad.dtype == torch.float32
    assert rel_rms(naive_expert_mlp(x.detach().float(), inp["token_idx"], inp["expert_idx"], gate_up.detach(),
                                    down.detach()), y) < 5e-3


@requires_triton
def test_ops_backends_agree():
    inp = make_inputs("balanced", N=16, H=40, I=24, E=4, seed=13)
    fns = [lambda x, t, e, gu, dn, b=b: ops.expert_mlp(x, t, e, gu, dn, backend=b) for b in ("torch", "triton")]
    (y_t, g_t, _), (y_tr, g_tr, _) = (run_with_grads(fn, inp) for fn in fns)
    assert rel_rms(y_t, y_tr) < 1e-5
    for name in GRADS:
        assert rel_rms(g_t[name], g_tr[name]) < 1e-5, name


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda d: d.update(x=d["x"][None]), r"x must be \[N, H\]"),
        (lambda d: d.update(gate_up=d["gate_up"][:, :, :3]), r"gate_up must be"),
        (lambda d: d.update(down=d["down"][:, :, :3]), r"down must be"),
        (lambda d: d.update(token_idx=d["token_idx"][:3]), r"token_idx and expert_idx"),
        (lambda d: d.update(x=d["x"].double()), r"not supported"),
    ],
    ids=["x-dims", "gate_up-shape", "down-shape", "index-lengths", "fp64"],
)
@requires_triton
def test_triton_bad_inputs_raise(change, match):
    inp = make_inputs("balanced", N=4, H=16, I=16, E=2, seed=14)
    change(inp)
    with pytest.raises(ValueError, match=match):
        triton_grouped_expert_mlp(**inp)
