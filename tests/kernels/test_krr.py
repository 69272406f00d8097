"""Cubit kernel-ridge-regression attention: vectorised Cholesky path vs the per-query solve, decode, padding, GQA."""

from __future__ import annotations

import pytest
import torch
from hf_arch.kernels.krr import krr_attention_torch, naive_krr_attention
from hf_arch.kernels.ops import krr_attention

ARGS = {"ridge": 0.1, "temperature": 2.0}


def _inputs(B=2, S=7, H=4, H_kv=2, D=5, Dv=3, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, S, H, D, generator=g).to(dtype)
    k = torch.randn(B, S, H_kv, D, generator=g).to(dtype)
    v = torch.randn(B, S, H_kv, Dv, generator=g).to(dtype)
    return q, k, v


def _mask(B, S):
    """Batch 0: 2 left-padding positions; batch 1: one padded position in the middle and one at the end."""
    mask = torch.ones(B, S, dtype=torch.long)
    mask[0, :2] = 0
    mask[1 % B, S // 2] = 0
    mask[1 % B, -1] = 0
    return mask


def _with_grads(fn, q, k, v, **kwargs):
    leaves = [x.detach().clone().requires_grad_(True) for x in (q, k, v)]
    out = fn(*leaves, **kwargs)
    do = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    (out * do).sum().backward()
    return [out] + [x.grad for x in leaves]


@pytest.mark.parametrize(
    "B,S,Tq,H,H_kv,D,Dv,padded",
    [
        (2, 7, 7, 4, 2, 5, 3, False),  # GQA 4/2, D_v != D
        (2, 7, 7, 4, 2, 5, 3, True),  # left, middle and right padding
        (1, 6, 6, 2, 2, 4, 4, False),  # MHA
        (2, 9, 3, 3, 1, 4, 6, True),  # MQA, decode over a cache
        (1, 1, 1, 1, 1, 3, 2, False),
    ],
)
def test_matches_naive_fp64(B, S, Tq, H, H_kv, D, Dv, padded):
    q, k, v = _inputs(B, S, H, H_kv, D, Dv)
    mask = _mask(B, S) if padded else None
    got = krr_attention_torch(q[:, S - Tq:], k, v, attention_mask=mask, **ARGS)
    ref = naive_krr_attention(q[:, S - Tq:], k, v, attention_mask=mask, **ARGS)
    assert got.shape == (B, Tq, H, Dv) and got.dtype == torch.float64
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    assert got.abs().max() > 0.1


@pytest.mark.parametrize("Tq", [7, 2])
def test_grads_match_naive_fp64(Tq):
    q, k, v = _inputs()
    q = q[:, 7 - Tq:]
    mask = _mask(2, 7)
    got = _with_grads(krr_attention_torch, q, k, v, attention_mask=mask, **ARGS)
    ref = _with_grads(naive_krr_attention, q, k, v, attention_mask=mask, **ARGS)
    for name, a, b in zip(("o", "dq", "dk", "dv"), got, ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11, msg=name)
    assert all(g.abs().max() > 1e-3 for g in got[1:])


def test_decode_equals_last_rows_of_full_forward():
    q, k, v = _inputs(S=8)
    mask = _mask(2, 8)
    full = krr_attention_torch(q, k, v, attention_mask=mask, **ARGS)
    for Tq in (1, 3):
        step = krr_attention_torch(q[:, -Tq:], k, v, attention_mask=mask, **ARGS)
        torch.testing.assert_close(step, full[:, -Tq:], rtol=1e-12, atol=1e-12)


def test_left_padding_equals_unpadded_run():
    # Batch row 0 holds a 6-token sequence after 3 padding positions filled with large garbage (even NaN in v).
    q, k, v = _inputs(B=2, S=9)
    k[0, :3], v[0, :3] = 50.0, float("nan")
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[0, :3] = 0
    out, dq, dk, dv = _with_grads(krr_attention_torch, q, k, v, attention_mask=mask, **ARGS)
    alone = krr_attention_torch(q[:1, 3:], k[:1, 3:], v[:1, 3:], **ARGS)
    torch.testing.assert_close(out[0, 3:], alone[0], rtol=1e-12, atol=1e-12)
    assert (out[0, :3] == 0).all()  # queries with no real key
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in (dq, dk, dv))
    assert (dk[0, :3] == 0).all() and (dv[0, :3] == 0).all()


def test_gqa_equals_repeated_kv():
    q, k, v = _inputs(H=4, H_kv=2)
    mask = _mask(2, 7)
    got = krr_attention_torch(q, k, v, attention_mask=mask, **ARGS)
    ref = krr_attention_torch(q, k.repeat_interleave(2, 2), v.repeat_interleave(2, 2), attention_mask=mask, **ARGS)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)


def test_fp32_close_to_fp64():
    q, k, v = _inputs(S=16)
    mask = _mask(2, 16)
    ref = krr_attention_torch(q, k, v, attention_mask=mask, **ARGS)
    got = krr_attention_torch(q.float(), k.float(), v.float(), attention_mask=mask, **ARGS)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-5)


def test_interpolates_with_tiny_ridge():
    # KRR with λ → 0 interpolates: a query equal to a training key returns that key's value. Softmax attention
    # (Nadaraya–Watson) would return a weighted average of all values instead.
    q, k, v = _inputs(B=1, S=6, H=2, H_kv=2)
    q[:, -1] = k[:, -1]
    out = krr_attention_torch(q, k, v, ridge=1e-6, temperature=4.0)
    torch.testing.assert_close(out[0, -1], v[0, -1], rtol=0, atol=1e-3)
    assert (out[0, -1] - v[0].mean(0)).abs().max() > 0.1


def test_public_op_dispatches_to_torch():
    q, k, v = _inputs()
    torch.testing.assert_close(krr_attention(q, k, v, **ARGS), krr_attention_torch(q, k, v, **ARGS))
    with pytest.raises(ValueError, match="backend 'triton' is not available"):
        krr_attention(q, k, v, backend="triton", **ARGS)


@pytest.mark.parametrize("fn", [naive_krr_attention, krr_attention_torch, krr_attention])
def test_bad_inputs_raise(fn):
    q, k, v = _inputs(B=1, S=5)
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="ridge must be a finite number > 0"):
            fn(q, k, v, ridge=bad, temperature=1.0)
        with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
            fn(q, k, v, ridge=0.1, temperature=bad)
    with pytest.raises(ValueError, match=r"q must be a 4-D floating tensor, got \(\(5, 4, 5\)"):
        fn(q[0], k, v, **ARGS)
    with pytest.raises(ValueError, match=r"k must be \[B, S, H_kv, D\] matching q"):
        fn(q, k[..., :4], v, **ARGS)
    with pytest.raises(ValueError, match=r"v must be \[B, S, H_kv, D_v\] matching k"):
        fn(q, k, v[:, :4], **ARGS)
    with pytest.raises(ValueError, match="H=4 must be divisible by k/v heads H_kv=3"):
        fn(q, torch.randn(1, 5, 3, 5).double(), torch.randn(1, 5, 3, 3).double(), **ARGS)
    with pytest.raises(ValueError, match="q has 5 positions, more than the 4 of k/v"):
        fn(q, k[:, :4], v[:, :4], **ARGS)
    with pytest.raises(ValueError, match="must share dtype and device"):
        fn(q, k.float(), v, **ARGS)
    with pytest.raises(ValueError, match=r"attention_mask must have shape \[B, T\] = \(1, 5\), got \(1, 4\)"):
        fn(q, k, v, attention_mask=torch.ones(1, 4), **ARGS)
