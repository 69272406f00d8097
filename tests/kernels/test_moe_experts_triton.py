"""Triton grouped expert MLP (forward + backward kernels) against the masked-loop reference.

Runs through the Triton interpreter on CPU (tests/conftest.py sets TRITON_INTERPRET=1 and NaN-poisoned buffers):
tiny shapes only. With the interpreter's blocks (BM=16, BN=BK=32) the shapes below cover several row blocks per
expert with a partial last one, H and I not multiples of the blocks (H=40, I=24), more than one output block
(H=64), and weight-gradient programs that loop over several row chunks. Every case checks y and the gradients of
x, gate_up and down under a random upstream gradient.
"""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

from hf_arch.kernels import ops  # noqa: E402
from hf_arch.kernels.buffers import new_buffer  # noqa: E402
from hf_arch.kernels.moe.naive import naive_expert_mlp  # noqa: E402
from hf_arch.kernels.moe.triton_moe import triton_grouped_expert_mlp  # noqa: E402

GRADS = ("x", "gate_up", "down")


def rel_rms(ref: torch.Tensor, got: torch.Tensor) -> float:
    """||ref - got|| / ||ref|| in float64 (0 when both are exactly equal, e.g. empty); a NaN (an element no kernel
    wrote) fails outright."""
    assert not torch.isnan(got).any(), "NaN in result (an element the kernel never wrote?)"
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


def compare(inputs, tol, fn=triton_grouped_expert_mlp):
    """fn vs the float64 reference on the same (rounded) inputs and upstream gradient."""
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


def test_poisoned_buffers_are_on():
    """The comparisons below only catch unwritten elements if new buffers start as NaN."""
    assert torch.isnan(new_buffer(3, dtype=torch.float32, device=torch.device("cpu"))).all()


CASES = {
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


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_matches_naive(case):
    shape, tol = case
    compare(make_inputs(**shape), tol)


def test_unused_expert_gets_exactly_zero_grads():
    inp = make_inputs("unused-expert", seed=9)
    _, grads = compare(inp, 1e-5)
    assert (grads["gate_up"][-1] == 0).all() and (grads["down"][-1] == 0).all()
    assert (grads["gate_up"][:-1] != 0).any() and (grads["down"][:-1] != 0).any()


def test_no_assignments():
    inp = make_inputs("empty", seed=10)
    y, grads = compare(inp, 0.0)
    assert y.shape == (0, inp["x"].shape[1])
    for name in GRADS:
        assert (grads[name] == 0).all(), name


def test_forward_without_grad_matches():
    """Without autograd the forward skips storing the pre-activation; the output is the same."""
    inp = make_inputs("balanced", seed=11)
    with torch.no_grad():
        y = triton_grouped_expert_mlp(**inp)
    torch.testing.assert_close(y, naive_expert_mlp(**inp), rtol=1e-5, atol=1e-5)


def test_fp32_weights_with_half_activations():
    """Weights are cast to x's dtype; their gradients come back in the weights' own dtype."""
    inp = make_inputs("balanced", N=8, H=32, I=16, E=3, seed=12)
    x = inp["x"].half().requires_grad_(True)
    gate_up, down = inp["gate_up"].requires_grad_(True), inp["down"].requires_grad_(True)
    y = triton_grouped_expert_mlp(x, inp["token_idx"], inp["expert_idx"], gate_up, down)
    y.float().pow(2).sum().backward()
    assert y.dtype == torch.float16 and gate_up.grad.dtype == down.grad.dtype == torch.float32
    assert rel_rms(naive_expert_mlp(x.detach().float(), inp["token_idx"], inp["expert_idx"], gate_up.detach(),
                                    down.detach()), y) < 5e-3


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
def test_bad_inputs_raise(change, match):
    inp = make_inputs("balanced", N=4, H=16, I=16, E=2, seed=14)
    change(inp)
    with pytest.raises(ValueError, match=match):
        triton_grouped_expert_mlp(**inp)
