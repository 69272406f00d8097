"""Triton sliding-window attention (forward + backward kernels) against the naive spec, computed in float64.

Runs through the Triton interpreter on CPU (tests/conftest.py sets TRITON_INTERPRET=1 and NaN-poisoned buffers):
tiny shapes only. Every comparison covers the output and the gradients of q, k, v and (when present) sink_logits.
Most tests shrink the kernel blocks to 16 so that T = 33..48 spans several query / key blocks.
"""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

from hf_arch.kernels.sliding_window import naive_sliding_window_attention  # noqa: E402
from hf_arch.kernels.sliding_window import triton_sliding_window as tsw  # noqa: E402
from hf_arch.kernels.sliding_window.triton_sliding_window import triton_sliding_window_attention  # noqa: E402

NAMES = ("o", "dq", "dk", "dv", "dsink")
TOL = {torch.float32: 1e-5, torch.float16: 3e-3}




@pytest.fixture
def small_blocks(monkeypatch):
    monkeypatch.setattr(tsw, "BLOCK_M", 16)
    monkeypatch.setattr(tsw, "BLOCK_N", 16)


def rel_rms(got: torch.Tensor, ref: torch.Tensor, floor: float = 1e-2) -> float:
    """RMS(got - ref) / max(RMS(ref), floor) in float64; the floor covers references that are exactly 0
    (window 1 without sinks: every probability is 1, so dq == 0)."""
    assert not torch.isnan(got).any(), "NaN in result (an element the kernel never wrote?)"
    got, ref = got.double(), ref.double()
    return ((got - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt().clamp_min(floor)).item()


def make_inputs(B=2, T=37, H=4, H_kv=2, D=20, S=3, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, D, generator=g).to(dtype)
    k = torch.randn(B, T, H_kv, D, generator=g).to(dtype)
    v = torch.randn(B, T, H_kv, D, generator=g).to(dtype)
    sinks = torch.randn(H, S, generator=g) if S else None
    return q, k, v, sinks


def run_with_grads(fn, q, k, v, sinks, **kwargs):
    leaves = [x.detach().clone().requires_grad_(True) for x in (q, k, v)]
    s = sinks.detach().clone().requires_grad_(True) if sinks is not None else None
    out = fn(*leaves, sink_logits=s, **kwargs)
    do = torch.randn(out.shape, generator=torch.Generator().manual_seed(123)).to(out.dtype)
    (out.double() * do.double()).sum().backward()
    return [out] + [x.grad for x in leaves] + ([s.grad] if s is not None else [])


def compare(q, k, v, sinks, tol=None, floor=1e-2, **kwargs) -> dict[str, float]:
    """Triton vs the naive spec run in float64 on the same (possibly fp16-rounded) inputs; returns the errors.

    ``floor`` bounds the RMS the errors are divided by (see :func:`rel_rms`)."""
    tol = TOL[q.dtype] if tol is None else tol
    got = run_with_grads(triton_sliding_window_attention, q, k, v, sinks, **kwargs)
    ref = run_with_grads(
        naive_sliding_window_attention, q.double(), k.double(), v.double(),
        None if sinks is None else sinks.double(), **kwargs,
    )
    errors = {}
    for name, a, b, like in zip(NAMES, got, ref, (q, q, k, v, sinks)):
        assert a.shape == b.shape and a.dtype == like.dtype, name
        assert torch.isfinite(a).all(), name
        errors[name] = rel_rms(a, b, floor)
        assert errors[name] < tol, (name, errors)
    return errors


@pytest.mark.parametrize(
    "T,window,D,S",  # window 1 without sinks: dq, dk are 0 up to the cancellation dO.V - delta (~1e-7 absolute)
    [
        (37, 5, 20, 3),  # T not a multiple of the block, window < block, D padded 20 -> 32, GQA 4/2
        (37, 5, 20, 0),
        (48, 18, 16, 2),  # the window reaches two key blocks back; last query of a key block starts a block
        (33, 1, 16, 2),  # window 1
        (33, 1, 16, 0),  # window 1 without sinks: P == 1, dq == 0
        (20, 64, 16, 0),  # window >= T: plain causal attention
        (1, 3, 16, 2),  # T = 1
    ],
)
def test_matches_naive_fp32(small_blocks, T, window, D, S):
    compare(*make_inputs(T=T, D=D, S=S), window=window, floor=1.0 if window == 1 and not S else 1e-2)


@pytest.mark.parametrize("S", [3, 0])
def test_matches_naive_fp16(small_blocks, S):
    compare(*make_inputs(T=37, D=20, S=S, dtype=torch.float16), window=7)


def test_default_blocks_and_custom_scale():
    # Default tile sizes (one 64-row block here), MHA and MQA, a custom scale.
    for H_kv in (4, 1):
        compare(*make_inputs(T=45, H_kv=H_kv, D=16, S=1), window=9, scale=0.3)


def test_cu_seqlens_with_length_one_sequence(small_blocks):
    lengths = [5, 1, 17, 9, 1]
    cu = torch.tensor([0, 5, 6, 23, 32, 33])
    q, k, v, sinks = make_inputs(B=1, T=sum(lengths), S=2)
    compare(q, k, v, sinks, window=6, cu_seqlens=cu)
    compare(q, k, v, None, window=40, cu_seqlens=cu)
    # Packed == each sequence alone.
    packed = triton_sliding_window_attention(q, k, v, 6, sink_logits=sinks, cu_seqlens=cu)
    for start, end in zip(cu[:-1].tolist(), cu[1:].tolist()):
        sl = slice(start, end)
        alone = triton_sliding_window_attention(q[:, sl], k[:, sl], v[:, sl], 6, sink_logits=sinks)
        torch.testing.assert_close(packed[:, sl], alone, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_attention_mask_left_padding(small_blocks, dtype):
    q, k, v, sinks = make_inputs(T=24, D=16, dtype=dtype)
    mask = torch.ones(2, 24, dtype=torch.long)
    mask[0, :5] = 0
    mask[1, :19] = 0  # the whole first key block is padding
    compare(q, k, v, sinks, window=4, attention_mask=mask)
    compare(q, k, v, None, window=4, attention_mask=mask)
    # Padding query rows see no key: with no sink they output exactly 0, and their gradients are finite (and 0).
    o, dq, dk, dv = run_with_grads(triton_sliding_window_attention, q, k, v, None, window=4, attention_mask=mask)
    assert (o[0, :5] == 0).all() and (o[1, :19] == 0).all()
    assert (dq[0, :5] == 0).all() and (dq[1, :19] == 0).all()
    for g in (dk, dv):  # padding keys take no gradient
        assert torch.isfinite(g).all()
        assert (g[0, :5] == 0).all() and (g[1, :19] == 0).all()


def test_sink_gradient_formula(small_blocks):
    # dsink[h, s] = -sum_{b, t} p_sink(t, s) * delta_t with p_sink = exp(sink - lse), delta_t = sum_d dO O.
    q, k, v, sinks = make_inputs(T=21, D=16, S=2)
    s = sinks.clone().requires_grad_(True)
    out = triton_sliding_window_attention(q, k, v, 5, sink_logits=s)
    do = torch.randn(out.shape, generator=torch.Generator().manual_seed(7))
    (out * do).sum().backward()
    scale = 16**-0.5
    scores = torch.einsum("bthd,bshd->bhts", q.double(), k.double().repeat_interleave(2, dim=2)) * scale
    t = torch.arange(21)
    band = ((t[:, None] - t[None, :]) >= 0) & ((t[:, None] - t[None, :]) < 5)
    sink_cols = sinks.double()[None, :, None].expand(2, 4, 21, 2)
    scores = torch.cat([scores.masked_fill(~band, float("-inf")), sink_cols], -1)
    lse = scores.logsumexp(-1)  # [B, H, T]
    delta = (do.double() * out.double()).sum(-1).transpose(1, 2)  # [B, H, T]
    expected = -(torch.exp(sinks.double()[None, :, None, :] - lse[..., None]) * delta[..., None]).sum((0, 2))
    assert rel_rms(s.grad, expected) < 1e-5


def test_bad_inputs_raise():
    q, k, v, sinks = make_inputs(B=1, T=6, D=16)
    fn = triton_sliding_window_attention
    with pytest.raises(ValueError, match="q must be 4-D"):
        fn(q[0], k, v, 2)
    with pytest.raises(ValueError, match="k and v"):
        fn(q, k, v[..., :8], 2)
    with pytest.raises(ValueError, match="dtype"):
        fn(q, k.half(), v.half(), 2)
    with pytest.raises(ValueError, match="divisible"):
        fn(q, torch.randn(1, 6, 3, 16), torch.randn(1, 6, 3, 16), 2)
    with pytest.raises(ValueError, match="window"):
        fn(q, k, v, 0)
    with pytest.raises(ValueError, match="sink_logits"):
        fn(q, k, v, 2, sink_logits=torch.zeros(3, 2))
    with pytest.raises(ValueError, match="attention_mask"):
        fn(q, k, v, 2, attention_mask=torch.ones(1, 5))
    with pytest.raises(ValueError, match="cu_seqlens"):
        fn(q, k, v, 2, cu_seqlens=torch.tensor([0, 3, 5]))
    with pytest.raises(ValueError, match="batch size must be 1"):
        q2, k2, v2, _ = make_inputs(B=2, T=6, D=16)
        fn(q2, k2, v2, 2, cu_seqlens=torch.tensor([0, 6]))
