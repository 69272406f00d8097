"""SA-Softmax attention, torch paths: naive spec vs a per-row loop, chunked vs naive, padding, empty rows, errors."""

from __future__ import annotations

import pytest
import torch
from hf_arch.kernels.sa_softmax import chunk as sa_chunk
from hf_arch.kernels.sa_softmax import (
    chunk_sa_softmax_attention,
    naive_sa_softmax_attention,
)

MODES = ("plain", "normalized")
NAMES = ("o", "dq", "dk", "dv")


def _rel_rms(a: torch.Tensor, b: torch.Tensor, floor: float = 1e-2) -> float:
    """RMS(a - b) / max(RMS(b), floor) in float64."""
    a, b = a.double(), b.double()
    return ((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt().clamp_min(floor)).item()


def _inputs(B=2, T=19, H=4, H_kv=2, D=8, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, D, generator=g).to(dtype)
    k = torch.randn(B, T, H_kv, D, generator=g).to(dtype)
    v = torch.randn(B, T, H_kv, D, generator=g).to(dtype)
    return q, k, v


def _padding(B, T):
    """Batch 0: 5 left-padding positions (its first 5 query rows see no key); batch 1: 4 right-padding positions."""
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, :5] = 0
    mask[1 % B, -4:] = 0
    return mask


def _run_with_grads(fn, q, k, v, **kwargs):
    leaves = [x.detach().clone().requires_grad_(True) for x in (q, k, v)]
    out = fn(*leaves, **kwargs)
    do = torch.randn(out.shape, generator=torch.Generator().manual_seed(123)).to(out.dtype)
    (out.double() * do.double()).sum().backward()
    return [out] + [x.grad for x in leaves]


def _direct_reference(q, k, v, mode, scale=None, attention_mask=None):
    """The paper's formula row by row with plain torch ops (autograd through min / max / softmax), in float64."""
    B, T, H, D = q.shape
    group = H // k.shape[2]
    scale = D**-0.5 if scale is None else scale
    real = torch.ones(B, T, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    rows = []
    for b in range(B):
        for t in range(T):
            for h in range(H):
                keys = [s for s in range(t + 1) if real[b, s]]
                if not keys:
                    rows.append(q.new_zeros(D, dtype=torch.float64) * q[b, t, h].double().sum())
                    continue
                K = k[b, keys, h // group].double()
                V = v[b, keys, h // group].double()
                x = K @ q[b, t, h].double() * scale
                p = torch.softmax(x, 0)
                if mode == "plain":
                    w = x * p
                else:
                    lo = torch.clamp(x.min(), max=0.0)
                    hi = torch.clamp(x.max(), min=0.0)
                    w = (x - lo) / (hi - lo).clamp_min(1e-6) * p
                rows.append(w @ V)
    return torch.stack(rows).view(B, T, H, D)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("padded", [False, True])
def test_naive_matches_direct_formula(mode, padded):
    q, k, v = _inputs(B=2, T=7, H=2, H_kv=1, D=4)
    mask = _padding(2, 7) if padded else None
    scale = None if padded else 0.7
    got = _run_with_grads(naive_sa_softmax_attention, q.double(), k.double(), v.double(), mode=mode, scale=scale,
                          attention_mask=mask)
    ref = _run_with_grads(_direct_reference, q.double(), k.double(), v.double(), mode=mode, scale=scale, attention_mask=mask)
    for name, a, b in zip(NAMES, got, ref):
        assert _rel_rms(a, b) < 1e-10, (name, _rel_rms(a, b))


def test_naive_matches_direct_formula_clamped_span():
    # Scores ~1e-8: b - a < EPS is clamped; no gradient through the clamped span, only through a in the numerator.
    q, k, v = (x.double() for x in _inputs(B=1, T=6, H=2, H_kv=1, D=4))
    q = q * 1e-8
    got = _run_with_grads(naive_sa_softmax_attention, q, k, v, mode="normalized")
    ref = _run_with_grads(_direct_reference, q, k, v, mode="normalized")
    assert got[0].abs().max() > 1e-3
    for name, a, b in zip(NAMES, got, ref):
        assert _rel_rms(a, b) < 1e-10, (name, _rel_rms(a, b))


def test_modes_differ_from_softmax_and_each_other():
    # Guards against a mode silently falling back to ordinary softmax attention.
    q, k, v = _inputs(B=1, T=9)
    plain = naive_sa_softmax_attention(q, k, v, mode="plain")
    norm = naive_sa_softmax_attention(q, k, v, mode="normalized")
    soft = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.repeat_interleave(2, 2).transpose(1, 2), v.repeat_interleave(2, 2).transpose(1, 2),
        is_causal=True,
    ).transpose(1, 2)
    assert _rel_rms(plain, soft) > 0.1 and _rel_rms(norm, soft) > 0.1 and _rel_rms(plain, norm) > 0.1
    # Position 0 attends only itself (p = 1): plain weight x; normalized (x - a) / (b - a) = 1 if x > 0 else 0.
    x00 = (q[0, 0] * k[0, 0].repeat_interleave(2, 0)).sum(-1) * 8**-0.5  # [H]
    assert torch.allclose(plain[0, 0], x00[:, None] * v[0, 0].repeat_interleave(2, 0), atol=1e-6)
    assert (x00 > 0).any() and (x00 < 0).any()
    assert torch.allclose(norm[0, 0], (x00 > 0).float()[:, None] * v[0, 0].repeat_interleave(2, 0), atol=1e-6)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "T,chunk,H_kv,padded",
    [
        (19, 8, 2, False),  # last query block partial, GQA 4/2
        (19, 8, 2, True),  # left + right padding, rows without keys
        (16, 8, 4, True),  # T a multiple of the block, MHA
        (13, 64, 1, False),  # one block, MQA
        (1, 8, 2, False),
    ],
)
def test_chunk_matches_naive_fp32(monkeypatch, mode, T, chunk, H_kv, padded):
    monkeypatch.setattr(sa_chunk, "CHUNK_SIZE", chunk)
    q, k, v = _inputs(T=T, H_kv=H_kv)
    mask = _padding(2, T) if padded and T > 5 else None
    ref = _run_with_grads(naive_sa_softmax_attention, q, k, v, mode=mode, attention_mask=mask)
    got = _run_with_grads(chunk_sa_softmax_attention, q, k, v, mode=mode, attention_mask=mask)
    for name, a, b, like in zip(NAMES, got, ref, (q, q, k, v)):
        assert a.shape == like.shape and a.dtype == like.dtype, name
        assert torch.isfinite(a).all(), name
        assert _rel_rms(a, b) < 1e-5, (name, _rel_rms(a, b))


@pytest.mark.parametrize("mode", MODES)
def test_chunk_matches_naive_fp16(monkeypatch, mode):
    monkeypatch.setattr(sa_chunk, "CHUNK_SIZE", 8)
    q, k, v = _inputs(T=21, dtype=torch.float16)
    mask = _padding(2, 21)
    ref = _run_with_grads(naive_sa_softmax_attention, q.double(), k.double(), v.double(), mode=mode,
                          attention_mask=mask)
    got = _run_with_grads(chunk_sa_softmax_attention, q, k, v, mode=mode, attention_mask=mask)
    for name, a, b in zip(NAMES, got, ref):
        assert a.dtype == torch.float16 and torch.isfinite(a).all(), name
        assert _rel_rms(a, b) < 3e-3, (name, _rel_rms(a, b))


@pytest.mark.parametrize("fn", [naive_sa_softmax_attention, chunk_sa_softmax_attention])
@pytest.mark.parametrize("mode", MODES)
def test_rows_without_keys_are_zero_with_zero_grads(fn, mode):
    q, k, v = _inputs(B=2, T=10)
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[0, :4] = 0  # query rows 0..3 of batch 0 see no key
    mask[1] = 0  # batch 1 entirely padding
    o, dq, dk, dv = _run_with_grads(fn, q, k, v, mode=mode, attention_mask=mask)
    for x in (o, dq, dk, dv):
        assert torch.isfinite(x).all()
    assert (o[0, :4] == 0).all() and (o[1] == 0).all() and (o[0, 4:] != 0).any()
    assert (dq[0, :4] == 0).all() and (dq[1] == 0).all()
    assert (dk[0, :4] == 0).all() and (dv[0, :4] == 0).all() and (dk[1] == 0).all() and (dv[1] == 0).all()


@pytest.mark.parametrize("fn", [naive_sa_softmax_attention, chunk_sa_softmax_attention])
def test_all_zero_scores_use_epsilon_not_nan(fn):
    # q = 0: every score is 0, so b - a = 0 is clamped to EPS and the factor (x - a) / EPS is 0.
    _, k, v = _inputs(B=1, T=6)
    q = torch.zeros(1, 6, 4, 8)
    o, dq, dk, dv = _run_with_grads(fn, q, k, v, mode="normalized")
    assert (o == 0).all() and all(torch.isfinite(x).all() for x in (dq, dk, dv))


@pytest.mark.parametrize("mode", MODES)
def test_gradcheck_fp64(mode):
    q, k, v = (x.double().requires_grad_(True) for x in _inputs(B=1, T=6, H=2, H_kv=1, D=3))
    pad = torch.tensor([[0, 1, 1, 1, 1, 1]])
    for fn in (naive_sa_softmax_attention, chunk_sa_softmax_attention):

        def run(q, k, v, fn=fn):
            return fn(q, k, v, mode=mode, attention_mask=pad)

        assert torch.autograd.gradcheck(run, (q, k, v))


@pytest.mark.parametrize("fn", [naive_sa_softmax_attention, chunk_sa_softmax_attention])
def test_bad_inputs_raise(fn):
    q, k, v = _inputs(B=1, T=5)
    with pytest.raises(ValueError, match=r"mode must be one of \('plain', 'normalized'\), got 'softmax'"):
        fn(q, k, v, mode="softmax")
    with pytest.raises(ValueError, match=r"q must be 4-D \[B, T, heads, D\], got shape \(5, 4, 8\)"):
        fn(q[0], k, v)
    with pytest.raises(ValueError, match="k and v must have the same shape"):
        fn(q, k, v[:, :4])
    with pytest.raises(ValueError, match=r"k/v must be \[B, T, H_kv, D\] matching q"):
        fn(q, k[:, :4], v[:, :4])
    with pytest.raises(ValueError, match="q, k, v must share a dtype"):
        fn(q, k.half(), v.half())
    with pytest.raises(ValueError, match="q, k, v must be on one device"):
        fn(q, k.to("meta"), v.to("meta"))
    with pytest.raises(ValueError, match="H=4 must be divisible by k/v heads H_kv=3"):
        fn(q, torch.randn(1, 5, 3, 8), torch.randn(1, 5, 3, 8))
    with pytest.raises(ValueError, match="q must be a floating tensor"):
        fn(q.long(), k, v)
    with pytest.raises(ValueError, match=r"attention_mask must have shape \[B, T\] = \(1, 5\), got \(1, 4\)"):
        fn(q, k, v, attention_mask=torch.ones(1, 4))
    with pytest.raises(ValueError, match="attention_mask must be on q's device"):
        fn(q, k, v, attention_mask=torch.ones(1, 5, device="meta"))
