"""Triton KDA (forward + backward kernels) against the step-by-step reference.

Runs through the Triton interpreter on CPU (tests/conftest.py sets TRITON_INTERPRET=1 and NaN-poisoned buffers):
tiny shapes only. Every comparison covers o, the final state and the gradients of every input.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

triton = pytest.importorskip("triton")

from hf_arch.kernels.kda import kda, naive_recurrent_kda  # noqa: E402
from hf_arch.kernels.kda import triton_kda as tk  # noqa: E402
from hf_arch.kernels.kda.triton_kda import triton_kda  # noqa: E402

NAMES = ("q", "k", "v", "g", "beta", "initial_state")


def rel_rms(ref: torch.Tensor, got: torch.Tensor) -> float:
    """||ref - got|| / ||ref|| in float64 (no absolute floor: fp32 agreement shows as ~1e-7)."""
    ref, got = ref.double(), got.double()
    assert not torch.isnan(got).any(), "NaN in result (an element the kernel never wrote?)"
    diff = (ref - got).norm().item()
    return 0.0 if diff == 0.0 else diff / max(ref.norm().item(), 1e-30)


def assert_close(name: str, ref: torch.Tensor, got: torch.Tensor, tol: float) -> None:
    assert ref.shape == got.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    assert ref.dtype == got.dtype, f"{name}: dtype {got.dtype} != {ref.dtype}"
    err = rel_rms(ref, got)
    assert err <= tol, f"{name}: relative RMS error {err:.3e} > {tol:.1e}"


def make_inputs(B=1, T=21, H=2, K=16, V=16, dtype=torch.float32, gate="normal", h0=True, N=None, raw_k=False,
                seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, K, generator=gen)
    k = torch.randn(B, T, H, K, generator=gen)
    if raw_k:  # no in-op L2 norm: keep |k|^2 beta < 2 by hand (the stable regime of the delta rule)
        k = 1.2 * F.normalize(k, dim=-1)
    v = torch.randn(B, T, H, V, generator=gen)
    x = torch.randn(B, T, H, K, generator=gen)
    g = {
        "normal": lambda: F.logsigmoid(x),  # per channel
        "weak": lambda: F.logsigmoid(x) / 100,  # g ~ 0
        "strong": lambda: -5 + 0.5 * x.clamp(-1, 1),  # g ~ -5
        "extreme": lambda: -500 + 100 * x.clamp(-1, 1),  # exp(g) underflows to 0
        "split": lambda: torch.where(torch.arange(K) < K // 2, -30.0, 0.0).expand(B, T, H, K).clone(),
    }[gate]()
    beta = torch.sigmoid(torch.randn(B, T, H, generator=gen))
    tensors = dict(q=q.to(dtype), k=k.to(dtype), v=v.to(dtype), g=g, beta=beta.to(dtype))
    if h0:
        tensors["initial_state"] = torch.randn(N or B, H, K, V, generator=gen)
    return tensors


def run_with_grads(fn, inputs, loss="both", seed=1, **kwargs):
    """Forward, then backward of (o * do).sum() + (ht * dht).sum() with random do, dht; returns (o, ht, grads)."""
    leaves = {n: t.detach().clone().requires_grad_(True) for n, t in inputs.items()}
    o, ht = fn(**leaves, output_final_state=loss != "o", **kwargs)
    gen = torch.Generator().manual_seed(seed)
    do = torch.randn(o.shape, generator=gen).to(o.dtype)
    total = 0
    if loss in ("both", "o"):
        total = total + (o.float() * do.float()).sum()
    if loss in ("both", "state"):
        total = total + (ht * torch.randn(ht.shape, generator=gen)).sum()
    total.backward()
    return o.detach(), None if ht is None else ht.detach(), {n: t.grad for n, t in leaves.items()}


def compare(inputs, tol, grad_tol=None, loss="both", **kwargs):
    o_ref, h_ref, g_ref = run_with_grads(naive_recurrent_kda, inputs, loss=loss, **kwargs)
    o, h, grads = run_with_grads(triton_kda, inputs, loss=loss, **kwargs)
    assert o.dtype == inputs["q"].dtype
    assert_close("o", o_ref, o, tol)
    if loss == "o":
        assert h is None
    else:
        assert h.dtype == torch.float32
        assert_close("final_state", h_ref, h, tol)
    for name in g_ref:
        assert grads[name] is not None, f"no gradient for {name}"
        if g_ref[name] is None:  # e.g. q when only the final state carries a gradient: the kernel gives zeros
            assert not grads[name].any(), f"d{name} should be zero"
            continue
        assert_close(f"d{name}", g_ref[name], grads[name], grad_tol or tol)


CASES = {
    # B = 2, T not a multiple of the checkpoint chunk (16), K not a power of two.
    "fp32-l2norm-B2-T37-K20-V32": (dict(B=2, T=37, K=20, V=32), dict(use_qk_l2norm=True), 1e-4, None),
    # No in-op norm (small keys), T a multiple of the chunk, V not a power of two, explicit scale.
    "fp32-raw-T16-K32-V20": (dict(T=16, K=32, V=20, raw_k=True), dict(scale=0.25), 1e-4, None),
    "fp16-l2norm-T23-K16-V20": (dict(T=23, K=16, V=20, dtype=torch.float16), dict(use_qk_l2norm=True), 2e-3, 5e-3),
    "fp32-T1-no-initial-state": (dict(T=1, K=16, V=20, h0=False), dict(use_qk_l2norm=True), 1e-4, None),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_matches_naive(case):
    shape, kwargs, tol, grad_tol = case
    compare(make_inputs(**shape), tol, grad_tol, **kwargs)


@pytest.mark.parametrize("gate", ["weak", "strong", "extreme", "split"])
def test_gates(gate):
    compare(make_inputs(T=20, gate=gate, seed=3), 1e-4, use_qk_l2norm=True)


def test_split_v_and_short_checkpoint_chunk(monkeypatch):
    """V split over 2 programs (dq, dk, dg, dbeta summed over them), a checkpoint every 5 steps."""
    monkeypatch.setattr(tk, "MAX_BLOCK_V", 16)
    monkeypatch.setattr(tk, "CHECKPOINT_CHUNK", 5)
    compare(make_inputs(T=23, K=20, V=20, seed=5), 1e-4, use_qk_l2norm=True, scale=0.3)


def test_cu_seqlens_equals_separate_runs():
    """Packed sequences of lengths 5, 1, 0, 14: each from its own initial state, like separate naive runs."""
    cu = torch.tensor([0, 5, 6, 6, 20])
    inputs = make_inputs(T=20, N=4, seed=6)
    o, ht, grads = run_with_grads(triton_kda, inputs, cu_seqlens=cu, use_qk_l2norm=True)

    leaves = {n: t.detach().clone().requires_grad_(True) for n, t in inputs.items()}
    outs, finals = [], []
    for n, (s, e) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        part = {name: t[:, s:e] for name, t in leaves.items() if name != "initial_state"}
        o_n, h_n = naive_recurrent_kda(
            **part, initial_state=leaves["initial_state"][n : n + 1], output_final_state=True, use_qk_l2norm=True
        )
        outs.append(o_n)
        finals.append(h_n)
    o_sep, h_sep = torch.cat(outs, 1), torch.cat(finals, 0)
    gen = torch.Generator().manual_seed(1)  # the same upstream gradients as run_with_grads
    do, dht = torch.randn(o.shape, generator=gen), torch.randn(ht.shape, generator=gen)
    ((o_sep * do).sum() + (h_sep * dht).sum()).backward()

    assert_close("o", o_sep.detach(), o, 1e-4)
    assert_close("final_state", h_sep.detach(), ht, 1e-4)
    torch.testing.assert_close(ht[2], inputs["initial_state"][2])  # the empty sequence keeps its state
    for name, t in leaves.items():
        assert_close(f"d{name}", t.grad, grads[name], 1e-4)


@pytest.mark.parametrize("loss", ["o", "state"])
def test_one_sided_upstream_gradient(loss):
    """Only o (final state not requested: no dht) or only the final state (no do) carries a gradient."""
    compare(make_inputs(T=7, seed=7), 1e-4, loss=loss, use_qk_l2norm=True)


def test_public_op_backends_agree():
    """``kda(backend="triton")`` against the torch backend (chunked: T > RECURRENT_MAX_TOKENS)."""
    inputs = make_inputs(T=21, seed=8)
    results = [run_with_grads(kda, inputs, use_qk_l2norm=True, backend=b) for b in ("torch", "triton")]
    (o_t, h_t, g_t), (o_k, h_k, g_k) = results
    assert_close("o", o_t, o_k, 1e-5)
    assert_close("final_state", h_t, h_k, 1e-5)
    for name in NAMES:
        assert_close(f"d{name}", g_t[name], g_k[name], 1e-5)


def _good():
    return make_inputs(T=5, seed=12)


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda d: d.update(k=d["k"][..., :3]), r"k must have the shape of q"),
        (lambda d: d.update(v=torch.zeros(1, 5, 4, 16)), r"v must be 4-D \[B, T, H, V\]"),
        (lambda d: d.update(g=d["g"][..., 0]), r"g must have shape \[B, T, H, K\]"),
        (lambda d: d.update(beta=d["beta"][:, :4]), r"beta must have shape"),
        (lambda d: d.update(v=d["v"].double()), r"share a dtype"),
        (lambda d: d.update(initial_state=d["initial_state"][..., :2]), r"initial_state must have shape"),
        (lambda d: d.update(cu_seqlens=torch.tensor([0, 2, 5])), r"initial_state must have shape .* = \(2, 2,"),
        (lambda d: d.update(cu_seqlens=torch.tensor([0, 4, 2, 5])), r"non-decreasing"),
    ],
    ids=["k-shape", "v-heads", "g-scalar", "beta-shape", "dtype", "h0-shape", "h0-vs-cu_seqlens", "cu_seqlens-order"],
)
def test_bad_inputs_raise(change, match):
    args = _good()
    change(args)
    with pytest.raises(ValueError, match=match):
        triton_kda(**args)


def test_cu_seqlens_requires_batch_one():
    args = make_inputs(B=2, T=5, h0=False, seed=13)
    with pytest.raises(ValueError, match="batch size must be 1"):
        triton_kda(**args, cu_seqlens=torch.tensor([0, 5]))
