"""Triton SA-Softmax attention (forward + backward kernels) against the naive spec, computed in float64.

Runs through the Triton interpreter on CPU (tests/conftest.py sets TRITON_INTERPRET=1 and NaN-poisoned buffers):
tiny shapes only. Every comparison covers the output and the gradients of q, k and v. Most tests shrink the kernel
tiles to 16 so that T = 40 spans three query / key tiles, the last one partial.
"""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

from hf_arch.kernels.buffers import POISON_ENV_VAR
from hf_arch.kernels.sa_softmax import (
    chunk_sa_softmax_attention,
    naive_sa_softmax_attention,
)
from hf_arch.kernels.sa_softmax import triton_sa_softmax as tsa
from hf_arch.kernels.sa_softmax.triton_sa_softmax import triton_sa_softmax_attention

MODES = ("plain", "normalized")
NAMES = ("o", "dq", "dk", "dv")
TOL = {torch.float32: 1e-5, torch.float16: 3e-3}


@pytest.fixture(autouse=True)
def poisoned(monkeypatch):
    # Fresh output buffers start as NaN: an element the kernels never write fails the comparison.
    monkeypatch.setenv(POISON_ENV_VAR, "1")


@pytest.fixture
def small_tiles(monkeypatch):
    monkeypatch.setattr(tsa, "BLOCK_M", 16)
    monkeypatch.setattr(tsa, "BLOCK_N", 16)


def rel_rms(got: torch.Tensor, ref: torch.Tensor, floor: float = 1e-2) -> float:
    """RMS(got - ref) / max(RMS(ref), floor) in float64."""
    assert not torch.isnan(got).any(), "NaN in result (an element the kernel never wrote?)"
    got, ref = got.double(), ref.double()
    return ((got - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt().clamp_min(floor)).item()


def make_inputs(B=2, T=40, H=4, H_kv=2, D=16, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, D, generator=g).to(dtype)
    k = torch.randn(B, T, H_kv, D, generator=g).to(dtype)
    v = torch.randn(B, T, H_kv, D, generator=g).to(dtype)
    return q, k, v


def run_with_grads(fn, q, k, v, **kwargs):
    leaves = [x.detach().clone().requires_grad_(True) for x in (q, k, v)]
    out = fn(*leaves, **kwargs)
    do = torch.randn(out.shape, generator=torch.Generator().manual_seed(123)).to(out.dtype)
    (out.double() * do.double()).sum().backward()
    return [out] + [x.grad for x in leaves]


def compare(q, k, v, tol=None, **kwargs) -> list[torch.Tensor]:
    """Triton vs the naive spec run in float64 on the same (possibly fp16-rounded) inputs; returns Triton's results."""
    tol = TOL[q.dtype] if tol is None else tol
    got = run_with_grads(triton_sa_softmax_attention, q, k, v, **kwargs)
    ref = run_with_grads(naive_sa_softmax_attention, q.double(), k.double(), v.double(), **kwargs)
    for name, a, b, like in zip(NAMES, got, ref, (q, q, k, v)):
        assert a.shape == b.shape and a.dtype == like.dtype, name
        assert torch.isfinite(a).all(), name
        err = rel_rms(a, b)
        assert err < tol, (name, err)
    return got


@pytest.mark.parametrize("mode", MODES)
def test_matches_naive_fp32_gqa_padding(small_tiles, mode):
    # T = 40 over 16-wide tiles (last one partial), GQA 4/2; batch 0 left-padded (rows 0..4 see no key),
    # batch 1 right-padded.
    q, k, v = make_inputs()
    pad = torch.ones(2, 40, dtype=torch.long)
    pad[0, :5] = 0
    pad[1, -6:] = 0
    o, dq, dk, dv = compare(q, k, v, mode=mode, attention_mask=pad)
    assert (o[0, :5] == 0).all() and (dq[0, :5] == 0).all()
    assert (dk[0, :5] == 0).all() and (dv[0, :5] == 0).all() and (dk[1, -6:] == 0).all() and (dv[1, -6:] == 0).all()


@pytest.mark.parametrize("mode", MODES)
def test_matches_naive_fp16(small_tiles, mode):
    q, k, v = make_inputs(T=37, dtype=torch.float16)
    pad = torch.ones(2, 37, dtype=torch.long)
    pad[1, :3] = 0
    compare(q, k, v, mode=mode, attention_mask=pad)


@pytest.mark.parametrize("mode", MODES)
def test_default_tiles_mqa_mha_custom_scale(mode):
    # Default tile sizes (one 64-wide tile covers T = 45), D padded 20 -> 32, MHA and MQA, a custom scale.
    for H_kv in (4, 1):
        q, k, v = make_inputs(B=1, T=45, H_kv=H_kv, D=20)
        compare(q, k, v, mode=mode, scale=0.3)


def test_fully_padded_sequence_and_ties(small_tiles):
    # Batch 1 is all padding (zeros, zero grads). Batch 0 repeats key rows so that scores tie exactly: the min / max
    # gradient must go to the first of the tied keys in both implementations.
    q, k, v = make_inputs(T=33)
    k[0, 1::3] = k[0, 0::3][: k[0, 1::3].shape[0]]
    pad = torch.ones(2, 33, dtype=torch.long)
    pad[1] = 0
    o, dq, dk, dv = compare(q, k, v, mode="normalized", attention_mask=pad)
    assert all((x[1] == 0).all() for x in (o, dq, dk, dv))


def test_clamped_span_uses_epsilon(small_tiles):
    # q = 0: every score is 0, the span is clamped to EPS and the normalized factor is 0 everywhere.
    _, k, v = make_inputs(B=1, T=20)
    q = torch.zeros(1, 20, 4, 16)
    o = compare(q, k, v, mode="normalized")[0]
    assert (o == 0).all()
    # Scores ~1e-8: the span (< EPS = 1e-6) is clamped, the output is small but not 0, and no gradient flows through
    # the clamped span (only through a in the numerator).
    q = torch.randn(1, 20, 4, 16, generator=torch.Generator().manual_seed(5)) * 1e-8
    o = compare(q, k, v, mode="normalized")[0]
    assert o.abs().max() > 1e-3


def test_agrees_with_chunk_path(small_tiles):
    q, k, v = make_inputs(B=1, T=35)
    for mode in MODES:
        got = run_with_grads(triton_sa_softmax_attention, q, k, v, mode=mode)
        ref = run_with_grads(chunk_sa_softmax_attention, q, k, v, mode=mode)
        for name, a, b in zip(NAMES, got, ref):
            assert rel_rms(a, b) < 1e-5, (mode, name)


def test_bad_inputs_raise():
    q, k, v = make_inputs(B=1, T=20)
    fn = triton_sa_softmax_attention
    with pytest.raises(ValueError, match="mode must be one of"):
        fn(q, k, v, mode="Plain")
    with pytest.raises(ValueError, match="q must be 4-D"):
        fn(q[0], k, v)
    with pytest.raises(ValueError, match="q, k, v must share a dtype"):
        fn(q, k.half(), v.half())
    with pytest.raises(ValueError, match="q, k, v must be on one device"):
        fn(q, k.to("meta"), v.to("meta"))
    with pytest.raises(ValueError, match="divisible"):
        fn(q, k[:, :, :1].expand(1, 20, 3, 16), v[:, :, :1].expand(1, 20, 3, 16))
    with pytest.raises(ValueError, match=r"attention_mask must have shape \[B, T\]"):
        fn(q, k, v, attention_mask=torch.ones(1, 19))
