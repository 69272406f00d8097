"""Gated delta rule: chunk and recurrent paths against the step-by-step fp32 reference (tiny shapes, fast)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hf_arch.kernels.delta_rule import (
    chunk_gated_delta_rule,
    fused_recurrent_gated_delta_rule,
    naive_recurrent_gated_delta_rule,
)




def rel_rms(ref: torch.Tensor, got: torch.Tensor) -> float:
    ref, got = ref.double(), got.double()
    assert not torch.isnan(got).any(), "NaN in result"
    if (ref - got).abs().max().item() <= 1e-6:
        return 0.0
    return ((ref - got).norm() / ref.norm().clamp_min(1e-12)).item()


def assert_close(name: str, ref: torch.Tensor, got: torch.Tensor, tol: float) -> None:
    assert ref.shape == got.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    err = rel_rms(ref, got)
    assert err <= tol, f"{name}: relative RMS error {err:.3e} > {tol:.1e}"


def make_inputs(B=2, T=37, H=2, K=24, V=20, HV=None, dtype=torch.float32, gate="normal", beta_mode="rand",
                h0=True, N=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    HV = HV or H
    q = torch.randn(B, T, H, K, generator=gen)
    k = torch.randn(B, T, H, K, generator=gen)
    v = torch.randn(B, T, HV, V, generator=gen)
    x = torch.randn(B, T, HV, generator=gen)
    if gate == "normal":
        g = F.logsigmoid(x)
    elif gate == "weak":
        g = F.logsigmoid(x) / 100
    elif gate == "strong":
        g = -(5 + 15 * torch.rand(B, T, HV, generator=gen))
    elif gate == "zero":  # some gates switched off (g = 0: no decay), the rest normal
        g = F.logsigmoid(x) * (torch.rand(B, T, HV, generator=gen) > 0.5)
    else:
        raise ValueError(gate)
    y = torch.randn(B, T, HV, generator=gen)
    beta = {"rand": torch.sigmoid(y), "low": 1e-4 * torch.sigmoid(y), "high": 1 - 1e-4 * torch.sigmoid(y)}[beta_mode]
    state = torch.randn(N or B, HV, K, V, generator=gen) if h0 else None
    tensors = dict(q=q.to(dtype), k=k.to(dtype), v=v.to(dtype), g=g, beta=beta.to(dtype))
    if state is not None:
        tensors["initial_state"] = state
    for t in tensors.values():
        t.requires_grad_(True)
    return tensors


def run_with_grads(fn, inputs, seed=1, **kwargs):
    """Forward, then backward of (o * do).sum() + (ht * dht).sum(); returns (o, ht, {name: grad})."""
    leaves = {n: t.detach().clone().requires_grad_(True) for n, t in inputs.items()}
    o, ht = fn(**leaves, output_final_state=True, **kwargs)
    gen = torch.Generator().manual_seed(seed)
    do = torch.randn(o.shape, generator=gen).to(o.dtype)
    dht = torch.randn(ht.shape, generator=gen)
    ((o.float() * do.float()).sum() + (ht * dht).sum()).backward()
    return o.detach(), ht.detach(), {n: t.grad for n, t in leaves.items()}


def chunk16(**kw):
    return chunk_gated_delta_rule(**kw, chunk_size=16)


def compare(fn, inputs, tol, grad_tol=None, **kwargs):
    o_ref, h_ref, g_ref = run_with_grads(naive_recurrent_gated_delta_rule, inputs, **kwargs)
    o, h, grads = run_with_grads(fn, inputs, **kwargs)
    assert o.dtype == inputs["q"].dtype and h.dtype == torch.float32
    assert_close("o", o_ref, o, tol)
    assert_close("final_state", h_ref, h, tol)
    for name in g_ref:
        assert grads[name] is not None, f"no gradient for {name}"
        assert_close(f"d{name}", g_ref[name], grads[name], grad_tol or tol)


FNS = {"chunk": chunk16, "recurrent": fused_recurrent_gated_delta_rule}


@pytest.mark.parametrize("fn", FNS.values(), ids=FNS.keys())
@pytest.mark.parametrize("l2", [False, True], ids=["raw", "l2norm"])
@pytest.mark.parametrize("T", [1, 16, 37])
def test_matches_naive_fp32(fn, l2, T):
    inputs = make_inputs(T=T, K=24, V=20)
    if not l2:  # keep raw keys in the stable regime of the delta rule (|k|^2 beta < 2)
        with torch.no_grad():
            inputs["k"].mul_(0.2)
    compare(fn, inputs, 1e-4, use_qk_l2norm=l2)


@pytest.mark.parametrize("fn", FNS.values(), ids=FNS.keys())
@pytest.mark.parametrize("gate", ["weak", "strong", "zero"])
@pytest.mark.parametrize("beta_mode", ["low", "high"])
def test_extreme_gates_and_beta(fn, gate, beta_mode):
    inputs = make_inputs(B=1, T=37, gate=gate, beta_mode=beta_mode, seed=3)
    compare(fn, inputs, 1e-4, use_qk_l2norm=True)


@pytest.mark.parametrize("fn", FNS.values(), ids=FNS.keys())
def test_fp16_inputs(fn):
    inputs = make_inputs(B=1, T=37, dtype=torch.float16, seed=4)
    compare(fn, inputs, 2e-3, grad_tol=5e-3, use_qk_l2norm=True)


@pytest.mark.parametrize("fn", FNS.values(), ids=FNS.keys())
@pytest.mark.parametrize("T", [1, 21])  # 1: the recurrent path's one-step form
def test_gva_and_no_initial_state(fn, T):
    inputs = make_inputs(B=1, T=T, H=1, HV=2, K=8, V=12, h0=False, seed=5)
    compare(fn, inputs, 1e-4, use_qk_l2norm=True, scale=0.3)


@pytest.mark.parametrize("fn", [*FNS.values(), naive_recurrent_gated_delta_rule], ids=[*FNS.keys(), "naive"])
def test_cu_seqlens_equals_separate_runs(fn):
    lengths = [5, 1, 20, 11]
    cu = torch.tensor([0, 5, 6, 26, 37])
    inputs = make_inputs(B=1, T=37, N=len(lengths), seed=6)
    o, ht, grads = run_with_grads(fn, inputs, cu_seqlens=cu, use_qk_l2norm=True)
    leaves = {n: t.detach().clone().requires_grad_(True) for n, t in inputs.items()}
    outs, finals = [], []
    for n, (s, e) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        part = {name: t[:, s:e] for name, t in leaves.items() if name != "initial_state"}
        o_n, h_n = naive_recurrent_gated_delta_rule(
            **part, initial_state=leaves["initial_state"][n : n + 1], output_final_state=True, use_qk_l2norm=True
        )
        outs.append(o_n)
        finals.append(h_n)
    o_sep, h_sep = torch.cat(outs, 1), torch.cat(finals, 0)
    assert_close("o", o_sep.detach(), o, 1e-4)
    assert_close("final_state", h_sep.detach(), ht, 1e-4)
    gen = torch.Generator().manual_seed(1)
    do, dht = torch.randn(o.shape, generator=gen), torch.randn(ht.shape, generator=gen)
    ((o_sep * do).sum() + (h_sep * dht).sum()).backward()
    for name, t in leaves.items():
        assert_close(f"d{name}", t.grad, grads[name], 1e-4)


def test_cu_seqlens_empty_sequence_keeps_state():
    inputs = {n: t.detach() for n, t in make_inputs(B=1, T=6, N=3, seed=7).items()}
    cu = torch.tensor([0, 3, 3, 6])
    for fn in (chunk16, fused_recurrent_gated_delta_rule, naive_recurrent_gated_delta_rule):
        o, ht = fn(**inputs, cu_seqlens=cu, output_final_state=True)
        assert o.shape == (1, 6, 2, 20)
        torch.testing.assert_close(ht[1], inputs["initial_state"][1])


@pytest.mark.parametrize("fn", FNS.values(), ids=FNS.keys())
def test_two_halves_chain_equals_full(fn):
    inputs = {n: t.detach() for n, t in make_inputs(B=2, T=37, seed=8).items()}
    o_full, h_full = fn(**inputs, output_final_state=True, use_qk_l2norm=True)
    first = {n: t[:, :19] for n, t in inputs.items() if n != "initial_state"}
    second = {n: t[:, 19:] for n, t in inputs.items() if n != "initial_state"}
    o1, h1 = fn(**first, initial_state=inputs["initial_state"], output_final_state=True, use_qk_l2norm=True)
    o2, h2 = fn(**second, initial_state=h1, output_final_state=True, use_qk_l2norm=True)
    assert_close("o", o_full, torch.cat([o1, o2], 1), 1e-5)
    assert_close("final_state", h_full, h2, 1e-5)


def test_chunk_size_does_not_change_result():
    inputs = {n: t.detach() for n, t in make_inputs(B=1, T=37, seed=9).items()}
    ref, h_ref = chunk_gated_delta_rule(**inputs, output_final_state=True, use_qk_l2norm=True, chunk_size=64)
    for c in (1, 5, 16):
        o, h = chunk_gated_delta_rule(**inputs, output_final_state=True, use_qk_l2norm=True, chunk_size=c)
        assert_close(f"o(chunk={c})", ref, o, 1e-5)
        assert_close(f"state(chunk={c})", h_ref, h, 1e-5)


def test_no_final_state_when_not_requested():
    inputs = {n: t.detach() for n, t in make_inputs(B=1, T=4, seed=10).items()}
    for fn in (chunk16, fused_recurrent_gated_delta_rule, naive_recurrent_gated_delta_rule):
        o, ht = fn(**inputs)
        assert ht is None and o.shape == (1, 4, 2, 20)


def test_matches_transformers_torch_chunk_gated_delta_rule():
    qwen3_next = pytest.importorskip("transformers.models.qwen3_next.modeling_qwen3_next")
    ref_fn = getattr(qwen3_next, "torch_chunk_gated_delta_rule", None)
    if ref_fn is None:
        pytest.skip("transformers has no torch_chunk_gated_delta_rule")
    ref_fn = getattr(ref_fn, "__wrapped__", ref_fn)  # the pure-torch path, never a hub/fla kernel
    inputs = {n: t.detach() for n, t in make_inputs(B=2, T=37, K=16, V=16, seed=11).items()}
    # transformers takes [B, T, H, D] like fla (it transposes internally), scale fixed at K**-0.5, and its
    # l2norm flag is called use_qk_l2norm_in_kernel (same eps-inside-rsqrt formula).
    o_ref, h_ref = ref_fn(
        inputs["q"], inputs["k"], inputs["v"], inputs["g"], inputs["beta"], chunk_size=16,
        initial_state=inputs["initial_state"], output_final_state=True, use_qk_l2norm_in_kernel=True,
    )
    o, h = chunk_gated_delta_rule(**inputs, output_final_state=True, use_qk_l2norm=True, chunk_size=16)
    assert_close("o", o_ref, o, 1e-4)
    assert_close("final_state", h_ref, h, 1e-4)


def _good():
    return {n: t.detach() for n, t in make_inputs(B=1, T=5, K=4, V=3, seed=12).items()}


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda d: d.update(k=d["k"][..., :3]), r"k must have the shape of q"),
        (lambda d: d.update(q=d["q"][0]), r"q must be 4-D"),
        (lambda d: d.update(v=d["v"][:, :4]), r"v must be 4-D"),
        (lambda d: d.update(v=torch.zeros(1, 5, 3, 3)), r"v heads"),
        (lambda d: d.update(g=d["g"][:, :4]), r"g must have shape"),
        (lambda d: d.update(beta=d["beta"][..., None]), r"beta must have shape"),
        (lambda d: d.update(v=d["v"].double()), r"share a dtype"),
        (lambda d: d.update(g=torch.zeros(1, 5, 2, dtype=torch.long)), r"g must be a floating-point"),
        (lambda d: d.update(initial_state=d["initial_state"][..., :2]), r"initial_state must have shape"),
        (lambda d: d.update(cu_seqlens=torch.tensor([0, 2, 4])), r"cu_seqlens must start at 0 and end at T=5"),
        (lambda d: d.update(cu_seqlens=torch.tensor([0, 4, 2, 5])), r"non-decreasing"),
        (lambda d: d.update(cu_seqlens=torch.tensor([0.0, 5.0])), r"cu_seqlens must be a 1-D integer"),
        (lambda d: d.update(cu_seqlens=torch.tensor([0, 2, 5])), r"initial_state must have shape \[N, HV, K, V\] = \(2,"),
    ],
)
@pytest.mark.parametrize(
    "fn", [chunk_gated_delta_rule, fused_recurrent_gated_delta_rule, naive_recurrent_gated_delta_rule],
    ids=["chunk", "recurrent", "naive"],
)
def test_bad_inputs_raise(fn, change, match):
    args = _good()
    change(args)
    with pytest.raises(ValueError, match=match):
        fn(**args)


def test_cu_seqlens_requires_batch_one():
    args = {n: t.detach() for n, t in make_inputs(B=2, T=5, K=4, V=3, h0=False, seed=13).items()}
    with pytest.raises(ValueError, match="batch size must be 1"):
        chunk_gated_delta_rule(**args, cu_seqlens=torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="chunk_size"):
        chunk_gated_delta_rule(**args, chunk_size=0)
