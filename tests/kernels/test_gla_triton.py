"""Triton GLA (forward + backward kernels) against the step-by-step reference in float64.

Runs through the Triton interpreter on CPU (tests/conftest.py sets TRITON_INTERPRET=1 and NaN-poisoned buffers):
tiny shapes only. Every comparison covers o, the final state and the gradients of q, k, v, g and initial_state,
with random upstream gradients on both o and the final state.
"""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

from hf_arch.kernels.buffers import new_buffer  # noqa: E402
from hf_arch.kernels.gla import naive_recurrent_gla  # noqa: E402
from hf_arch.kernels.gla import triton_gla as tg  # noqa: E402
from hf_arch.kernels.gla.triton_gla import triton_gla  # noqa: E402

GRADS = ("q", "k", "v", "g", "initial_state")




def rel_rms(ref: torch.Tensor, got: torch.Tensor) -> float:
    """||ref - got|| / ||ref|| in float64; a NaN (an element no kernel wrote) fails outright."""
    assert not torch.isnan(got).any(), "NaN in result (an element the kernel never wrote?)"
    ref, got = ref.double(), got.double()
    diff = (ref - got).norm().item()
    return 0.0 if diff == 0.0 else diff / max(ref.norm().item(), 1e-30)


def assert_close(name: str, ref: torch.Tensor, got: torch.Tensor, tol: float) -> None:
    assert ref.shape == got.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    err = rel_rms(ref, got)
    assert err <= tol, f"{name}: relative RMS error {err:.3e} > {tol:.1e}"


def make_inputs(B=2, T=37, H=2, K=20, V=32, dtype=torch.float32, g_dtype=torch.float32, gate="mixed", h0=True,
                N=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, K, generator=gen)
    k = torch.randn(B, T, H, K, generator=gen)
    v = torch.randn(B, T, H, V, generator=gen)
    u = torch.rand(B, T, H, K, generator=gen)
    g = {
        "mixed": lambda: -3.0 * u,  # g in [-3, 0]
        "weak": lambda: -1e-3 * (0.9 + 0.2 * u),  # g ~ -1e-3: almost no decay
        "strong": lambda: -5.5 + u,  # g in [-5.5, -4.5]
        "zero": lambda: torch.zeros_like(u),  # plain linear attention
        "extreme": lambda: -250.0 - 750.0 * u,  # exp(g) underflows to 0 in fp32
    }[gate]()
    tensors = dict(q=q.to(dtype), k=k.to(dtype), v=v.to(dtype), g=g.to(g_dtype))
    if h0:
        tensors["initial_state"] = torch.randn(N or B, H, K, V, generator=gen, dtype=torch.float64).to(
            torch.float64 if dtype == torch.float64 else torch.float32
        )
    return tensors


def run_with_grads(fn, inputs, loss="both", seed=1, round_to=None, **kwargs):
    """Forward, then backward of (o * do).sum() + (ht * dht).sum() with random do, dht; returns (o, ht, grads).

    ``do`` is rounded to ``round_to`` (default: q's dtype) first, so a float64 reference run with the low-precision
    run's dtype as ``round_to`` sees exactly the same upstream gradient.
    """
    leaves = {n: t.detach().clone().requires_grad_(True) for n, t in inputs.items()}
    o, ht = fn(**leaves, output_final_state=loss != "o", **kwargs)
    gen = torch.Generator().manual_seed(seed)
    do = torch.randn(o.shape, generator=gen).to(round_to or inputs["q"].dtype).to(o.dtype)
    total = 0
    if loss in ("both", "o"):
        total = total + (o * do).sum()
    if loss in ("both", "state"):
        total = total + (ht * torch.randn(ht.shape, generator=gen).to(ht.dtype)).sum()
    total.backward()
    return o.detach(), None if ht is None else ht.detach(), {n: t.grad for n, t in leaves.items()}


def compare(inputs, tol, grad_tol=None, loss="both", dg_tol=None, **kwargs):
    """Triton vs the float64 reference run on the same (rounded) inputs: o, final state and every gradient."""
    ref_inputs = {n: t.double() for n, t in inputs.items()}
    o_ref, h_ref, g_ref = run_with_grads(naive_recurrent_gla, ref_inputs, loss=loss, round_to=inputs["q"].dtype,
                                         **kwargs)
    o, h, grads = run_with_grads(triton_gla, inputs, loss=loss, **kwargs)
    assert o.dtype == inputs["q"].dtype and o.shape == o_ref.shape
    assert_close("o", o_ref, o, tol)
    if loss == "o":
        assert h is None
    else:
        assert h.dtype == (torch.float64 if inputs["q"].dtype == torch.float64 else torch.float32)
        assert_close("final_state", h_ref, h, tol)
    errors = {}
    for name in g_ref:
        assert grads[name] is not None, f"no gradient for {name}"
        assert grads[name].dtype == inputs[name].dtype, name
        if g_ref[name] is None:  # e.g. q when only the final state carries a gradient: the kernel gives zeros
            assert not grads[name].any(), f"d{name} should be zero"
            continue
        errors[name] = rel_rms(g_ref[name], grads[name])
        limit = dg_tol if (name == "g" and dg_tol is not None) else (grad_tol or tol)
        assert errors[name] <= limit, f"d{name}: relative RMS error {errors[name]:.3e} > {limit:.1e}"
    return errors


def test_poisoned_buffers_are_on():
    """The comparisons below only catch unwritten elements if new buffers start as NaN."""
    assert torch.isnan(new_buffer(3, dtype=torch.float32, device=torch.device("cpu"))).all()


CASES = {
    # T not a multiple of anything, K not a power of two (padded to 32 and masked).
    "fp32-T37-K20-V32": (dict(T=37, K=20, V=32), {}, 1e-5, None),
    # V not a power of two, explicit scale.
    "fp32-T16-K32-V20-scale": (dict(T=16, K=32, V=20, seed=1), dict(scale=0.3), 1e-5, None),
    # fp16 q/k/v with fp32 gates, and with fp16 gates.
    "fp16-T23-K16-V20": (dict(T=23, K=16, V=20, dtype=torch.float16, seed=2), {}, 2e-3, None),
    "fp16-g16-T9-K20-V16": (dict(B=1, T=9, K=20, V=16, dtype=torch.float16, g_dtype=torch.float16, seed=3), {},
                            2e-3, None),
    # A single step without an initial state (decode from scratch).
    "fp32-T1-no-initial-state": (dict(T=1, K=16, V=20, h0=False, seed=4), {}, 1e-5, None),
    # fp64 accumulation: the backward identities hold to rounding.
    "fp64-T11-K20-V20": (dict(B=1, T=11, K=20, V=20, dtype=torch.float64, g_dtype=torch.float64, seed=5), {}, 1e-12, None),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_matches_naive(case):
    shape, kwargs, tol, grad_tol = case
    compare(make_inputs(**shape), tol, grad_tol, **kwargs)


def test_bf16_inputs():
    compare(make_inputs(B=1, T=9, H=1, K=16, V=16, dtype=torch.bfloat16, seed=6), 1e-2)


@pytest.mark.parametrize("gate, dg_tol", [("weak", None), ("strong", 1e-3), ("zero", None)])
def test_gates(gate, dg_tol):
    # dg comes from a reverse cumsum of q*dq - k*dk: with strong gates the true dg is small next to those terms,
    # so its relative error grows (observed ~6e-5 to 9e-5 at g ~ -5 in fp32); every other quantity stays at fp32 rounding.
    compare(make_inputs(B=1, T=21, K=16, V=16, gate=gate, seed=7), 1e-5, dg_tol=dg_tol)


def test_zero_gate_is_plain_linear_attention():
    x = make_inputs(B=1, T=10, H=1, K=16, V=16, gate="zero", h0=False, seed=8)
    o, _ = triton_gla(x["q"], x["k"], x["v"], x["g"], scale=1.0)
    q, k, v = x["q"][0, :, 0], x["k"][0, :, 0], x["v"][0, :, 0]
    torch.testing.assert_close(o[0, :, 0], (q @ k.T).tril() @ v, rtol=1e-5, atol=1e-4)


def test_extreme_gates_stay_finite():
    """g in [-1000, -250]: o, the state and all gradients but dg match; dg (truly ~0) has only a tiny absolute error."""
    inputs = make_inputs(B=1, T=13, H=1, K=16, V=16, gate="extreme", seed=9)
    o_ref, h_ref, g_ref = run_with_grads(naive_recurrent_gla, {n: t.double() for n, t in inputs.items()})
    o, h, grads = run_with_grads(triton_gla, inputs)
    assert torch.isfinite(o).all() and torch.isfinite(h).all()
    assert_close("o", o_ref, o, 1e-5)
    assert_close("final_state", h_ref, h, 1e-5)
    for name in ("q", "k", "v", "initial_state"):
        assert_close(f"d{name}", g_ref[name], grads[name], 1e-5)
    assert torch.isfinite(grads["g"]).all()
    scale_of_terms = (inputs["q"] * grads["q"]).norm() + (inputs["k"] * grads["k"]).norm()
    assert (grads["g"].double() - g_ref["g"]).norm() <= 1e-5 * scale_of_terms


def test_split_k_and_v_blocks(monkeypatch):
    """K = V = 20 over blocks of 16: 2 K blocks x 2 V blocks, partial o / dq / dk / dv / dg summed in torch."""
    monkeypatch.setattr(tg, "MAX_BLOCK_K", 16)
    monkeypatch.setattr(tg, "MAX_BLOCK_V", 16)
    assert tg._blocks(20, 20)[2:4] == (2, 2)
    compare(make_inputs(B=1, T=13, K=20, V=20, seed=10), 1e-5, scale=0.4)


def test_cu_seqlens_equals_separate_runs():
    """Packed sequences of lengths 5, 1, 0, 14: each from its own initial state, like separate reference runs."""
    cu = torch.tensor([0, 5, 6, 6, 20])
    inputs = make_inputs(B=1, T=20, K=20, V=16, N=4, seed=11)
    o, ht, grads = run_with_grads(triton_gla, inputs, cu_seqlens=cu)

    leaves = {n: t.detach().double().requires_grad_(True) for n, t in inputs.items()}
    outs, finals = [], []
    for n, (s, e) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        part = {name: t[:, s:e] for name, t in leaves.items() if name != "initial_state"}
        o_n, h_n = naive_recurrent_gla(**part, initial_state=leaves["initial_state"][n : n + 1],
                                       output_final_state=True)
        outs.append(o_n)
        finals.append(h_n)
    o_sep, h_sep = torch.cat(outs, 1), torch.cat(finals, 0)
    gen = torch.Generator().manual_seed(1)  # the same upstream gradients as run_with_grads
    do, dht = torch.randn(o.shape, generator=gen), torch.randn(ht.shape, generator=gen)
    ((o_sep * do.double()).sum() + (h_sep * dht.double()).sum()).backward()

    assert_close("o", o_sep.detach(), o, 1e-5)
    assert_close("final_state", h_sep.detach(), ht, 1e-5)
    torch.testing.assert_close(ht[2], inputs["initial_state"][2])  # the empty sequence keeps its state
    torch.testing.assert_close(grads["initial_state"][2], dht[2])  # ... and passes its gradient straight through
    for name, t in leaves.items():
        assert_close(f"d{name}", t.grad, grads[name], 1e-5)


def test_cu_seqlens_fp16_split_blocks_no_initial_state(monkeypatch):
    """Varlen with a length-1 sequence, fp16, K split over 2 blocks, no initial state."""
    monkeypatch.setattr(tg, "MAX_BLOCK_K", 16)
    cu = torch.tensor([0, 1, 9, 16])
    compare(make_inputs(B=1, T=16, K=20, V=16, dtype=torch.float16, h0=False, seed=12), 2e-3, cu_seqlens=cu)


@pytest.mark.parametrize("loss", ["o", "state"])
def test_one_sided_upstream_gradient(loss):
    """Only o (final state not requested: no dht) or only the final state (no do) carries a gradient."""
    compare(make_inputs(B=2, T=7, K=16, V=16, seed=13), 1e-5, loss=loss)


def test_empty_sequence_batch():
    x = make_inputs(B=2, T=0, K=16, V=16, seed=14)
    o, ht = triton_gla(**x, output_final_state=True)
    assert o.shape == (2, 0, 2, 16)
    torch.testing.assert_close(ht, x["initial_state"])


def _good():
    return make_inputs(B=1, T=5, K=16, V=16, seed=15)


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda d: d.update(k=d["k"][..., :3]), r"k shape"),
        (lambda d: d.update(g=d["g"][:, :4]), r"g shape"),
        (lambda d: d.update(v=d["v"][:, :4]), r"v shape"),
        (lambda d: d.update(q=d["q"][0]), r"4-D"),
        (lambda d: d.update(v=d["v"].double()), r"share a dtype"),
        (lambda d: d.update(initial_state=d["initial_state"][..., :2]), r"initial_state shape"),
        (lambda d: d.update(cu_seqlens=torch.tensor([0, 2, 5])), r"initial_state shape .* \(2, 2, 16, 16\)"),
        (lambda d: d.update(cu_seqlens=torch.tensor([0, 4, 2, 5])), r"non-decreasing"),
        (lambda d: d.update(cu_seqlens=torch.tensor([0, 3])), r"end at T"),
    ],
    ids=["k-shape", "g-shape", "v-shape", "not-4d", "dtype", "h0-shape", "h0-vs-cu_seqlens", "cu-order", "cu-end"],
)
def test_bad_inputs_raise(change, match):
    args = _good()
    change(args)
    with pytest.raises(ValueError, match=match):
        triton_gla(**args)


def test_cu_seqlens_requires_batch_one():
    args = make_inputs(B=2, T=5, K=16, V=16, h0=False, seed=16)
    with pytest.raises(ValueError, match="batch size must be 1"):
        triton_gla(**args, cu_seqlens=torch.tensor([0, 5]))
