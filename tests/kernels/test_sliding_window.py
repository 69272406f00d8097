"""Sliding-window attention with sink logits: chunked path vs naive spec, naive vs SDPA, sinks, packing, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hf_arch.kernels.sliding_window import chunk_sliding_window_attention, naive_sliding_window_attention


def _rel_rms(a: torch.Tensor, b: torch.Tensor, floor: float = 1e-30) -> float:
    """RMS(a - b) / RMS(b); ``floor`` bounds the denominator where the reference is exactly 0 (window=1: dq == 0)."""
    a, b = a.double(), b.double()
    return ((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt().clamp_min(floor)).item()


def _inputs(B=2, T=19, H=4, H_kv=2, D=8, S=2, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, D, generator=g).to(dtype)
    k = torch.randn(B, T, H_kv, D, generator=g).to(dtype)
    v = torch.randn(B, T, H_kv, D, generator=g).to(dtype)
    sinks = torch.randn(H, S, generator=g) if S else None
    return q, k, v, sinks


def _run_with_grads(fn, q, k, v, sinks, **kwargs):
    leaves = [x.detach().clone().requires_grad_(True) for x in (q, k, v)]
    s = sinks.detach().clone().requires_grad_(True) if sinks is not None else None
    out = fn(*leaves, sink_logits=s, **kwargs)
    g = torch.Generator().manual_seed(123)
    (out.float() * torch.randn(out.shape, generator=g)).sum().backward()
    grads = [x.grad for x in leaves] + ([s.grad] if s is not None else [])
    return out, grads


def _compare(q, k, v, sinks, tol=1e-5, chunk_size=None, **kwargs):
    ref, ref_grads = _run_with_grads(naive_sliding_window_attention, q, k, v, sinks, **kwargs)
    out, grads = _run_with_grads(chunk_sliding_window_attention, q, k, v, sinks, chunk_size=chunk_size, **kwargs)
    assert out.shape == ref.shape == q.shape and out.dtype == q.dtype
    assert torch.isfinite(out).all()
    assert _rel_rms(out, ref) < tol
    for name, a, b in zip(("dq", "dk", "dv", "dsink"), grads, ref_grads):
        assert torch.isfinite(a).all(), name
        # floor 0.1: a gradient that is exactly 0 (one key in the row) comes out of the fused kernel at ~1e-7
        assert _rel_rms(a, b, floor=1e-1) < tol, (name, _rel_rms(a, b, floor=1e-1))


@pytest.mark.parametrize(
    "T,window,chunk_size",
    [(19, 4, None), (19, 4, 3), (19, 7, 5), (19, 1, None), (19, 1, 4), (5, 16, None), (1, 3, None), (33, 8, 8)],
)
def test_chunk_matches_naive_fp32(T, window, chunk_size):
    q, k, v, sinks = _inputs(T=T)
    _compare(q, k, v, sinks, window=window, chunk_size=chunk_size)
    _compare(q, k, v, None, window=window, chunk_size=chunk_size)


def test_chunk_matches_naive_fp16():
    q, k, v, sinks = _inputs(T=21, dtype=torch.float16)
    _compare(q, k, v, sinks, tol=2e-3, window=6, chunk_size=4)


def test_chunk_matches_naive_mqa_and_mha():
    for H_kv in (1, 2, 4):
        q, k, v, sinks = _inputs(T=13, H=4, H_kv=H_kv, S=1)
        _compare(q, k, v, sinks, window=5, chunk_size=4)
        _compare(q, k, v, None, window=5, chunk_size=4)  # the fused (SDPA per block) path


def test_naive_matches_sdpa_band_mask():
    q, k, v, _ = _inputs(B=2, T=17, H=4, H_kv=2, D=8, S=0)
    window, T = 5, 17
    t = torch.arange(T)
    band = ((t[:, None] - t[None, :]) >= 0) & ((t[:, None] - t[None, :]) < window)
    expected = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.repeat_interleave(2, dim=2).transpose(1, 2),
        v.repeat_interleave(2, dim=2).transpose(1, 2),
        attn_mask=band,
    ).transpose(1, 2)
    out = naive_sliding_window_attention(q, k, v, window)
    assert _rel_rms(out, expected) < 1e-5
    # A window covering everything is plain causal attention; a custom scale is honoured.
    causal = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.repeat_interleave(2, dim=2).transpose(1, 2),
        v.repeat_interleave(2, dim=2).transpose(1, 2),
        is_causal=True,
        scale=0.3,
    ).transpose(1, 2)
    assert _rel_rms(naive_sliding_window_attention(q, k, v, T + 3, scale=0.3), causal) < 1e-5


def test_very_negative_sinks_equal_no_sinks():
    q, k, v, _ = _inputs(T=15)
    sinks = torch.full((4, 3), -1e9)
    for fn in (naive_sliding_window_attention, chunk_sliding_window_attention):
        torch.testing.assert_close(fn(q, k, v, 4, sink_logits=sinks), fn(q, k, v, 4))


def test_large_sinks_shrink_output():
    q, k, v, _ = _inputs(T=15)
    base = chunk_sliding_window_attention(q, k, v, 4).abs().mean()
    sizes = [
        chunk_sliding_window_attention(q, k, v, 4, sink_logits=torch.full((4, 2), value)).abs().mean()
        for value in (0.0, 5.0, 20.0)
    ]
    assert base > sizes[0] > sizes[1] > sizes[2]
    assert sizes[2] < 1e-4 * base


def test_sink_is_a_softmax_column_with_zero_value():
    # One sink == an extra key whose score is the sink logit and whose value is zero, visible to every query.
    q, k, v, _ = _inputs(B=1, T=9, H=2, H_kv=2, D=4, S=0)
    sinks = torch.tensor([[0.7], [-0.4]])
    out = chunk_sliding_window_attention(q, k, v, 3, sink_logits=sinks, chunk_size=4)
    scale = 4**-0.5
    scores = torch.einsum("bthd,bshd->bhts", q, k) * scale
    t = torch.arange(9)
    band = ((t[:, None] - t[None, :]) >= 0) & ((t[:, None] - t[None, :]) < 3)
    scores = scores.masked_fill(~band, float("-inf"))
    scores = torch.cat([scores, sinks[None, :, None, :].expand(1, 2, 9, 1)], dim=-1)
    probs = scores.softmax(-1)[..., :9]
    expected = torch.einsum("bhts,bshd->bthd", probs, v)
    assert _rel_rms(out, expected) < 1e-5


def test_cu_seqlens_equals_separate_runs():
    lengths = [5, 1, 8, 3]
    T = sum(lengths)
    q, k, v, sinks = _inputs(B=1, T=T, S=2)
    cu = torch.tensor([0, 5, 6, 14, 17])
    _compare(q, k, v, sinks, window=4, chunk_size=3, cu_seqlens=cu)
    _compare(q, k, v, None, window=4, chunk_size=3, cu_seqlens=cu)
    for sink in (sinks, None):
        packed = chunk_sliding_window_attention(q, k, v, 4, sink_logits=sink, cu_seqlens=cu, chunk_size=3)
        for start, end in zip(cu[:-1].tolist(), cu[1:].tolist()):
            sl = slice(start, end)
            alone = naive_sliding_window_attention(q[:, sl], k[:, sl], v[:, sl], 4, sink_logits=sink)
            torch.testing.assert_close(packed[:, sl], alone, rtol=1e-5, atol=1e-6)


def test_attention_mask_padding_never_nan():
    q, k, v, sinks = _inputs(B=3, T=12)
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[0, :4] = 0  # left padding
    mask[1, -5:] = 0  # right padding
    mask[2, :] = 0  # all padding
    _compare(q, k, v, sinks, window=3, chunk_size=4, attention_mask=mask)
    _compare(q, k, v, None, window=3, chunk_size=4, attention_mask=mask)
    for fn in (naive_sliding_window_attention, chunk_sliding_window_attention):
        out = fn(q, k, v, 3, attention_mask=mask)
        assert torch.isfinite(out).all()
        assert (out[0, :4] == 0).all() and (out[2] == 0).all()  # no valid key, no sink -> 0
        # Left-padded row equals the unpadded run of its real tokens.
        torch.testing.assert_close(out[0, 4:], fn(q[:1, 4:], k[:1, 4:], v[:1, 4:], 3)[0], rtol=1e-5, atol=1e-6)


def test_bad_inputs_raise():
    q, k, v, sinks = _inputs(B=1, T=6)
    for fn in (naive_sliding_window_attention, chunk_sliding_window_attention):
        with pytest.raises(ValueError, match="q must be 4-D"):
            fn(q[0], k, v, 2)
        with pytest.raises(ValueError, match="k and v"):
            fn(q, k, v[..., :4], 2)
        with pytest.raises(ValueError, match="k/v"):
            fn(q, k[:, :5], v[:, :5], 2)
        with pytest.raises(ValueError, match="dtype"):
            fn(q, k.double(), v.double(), 2)
        with pytest.raises(ValueError, match="divisible"):
            fn(q, torch.randn(1, 6, 3, 8), torch.randn(1, 6, 3, 8), 2)
        with pytest.raises(ValueError, match="window"):
            fn(q, k, v, 0)
        with pytest.raises(ValueError, match="sink_logits"):
            fn(q, k, v, 2, sink_logits=torch.zeros(3, 2))
        with pytest.raises(ValueError, match="attention_mask"):
            fn(q, k, v, 2, attention_mask=torch.ones(1, 5))
        with pytest.raises(ValueError, match="cu_seqlens"):
            fn(q, k, v, 2, cu_seqlens=torch.tensor([0, 3, 5]))
        with pytest.raises(ValueError, match="cu_seqlens"):
            fn(q, k, v, 2, cu_seqlens=torch.tensor([0, 4, 2, 6]))
        with pytest.raises(ValueError, match="batch size must be 1"):
            q2, k2, v2, _ = _inputs(B=2, T=6)
            fn(q2, k2, v2, 2, cu_seqlens=torch.tensor([0, 6]))
    with pytest.raises(ValueError, match="chunk_size"):
        chunk_sliding_window_attention(q, k, v, 2, chunk_size=0)


def test_chunk_gradcheck_fp64():
    q, k, v, sinks = (x.double().requires_grad_(True) for x in _inputs(B=1, T=7, H=2, H_kv=1, D=3, S=2))
    mask = torch.tensor([[0, 1, 1, 1, 1, 1, 1]])

    def fn(q, k, v, s):
        return chunk_sliding_window_attention(q, k, v, 3, sink_logits=s, attention_mask=mask, chunk_size=2)

    assert torch.autograd.gradcheck(fn, (q, k, v, sinks))


def test_fused_path_gradcheck_fp64_with_empty_rows():
    """No sinks: the SDPA-per-block path, its opened-then-zeroed empty rows (left padding) included."""
    q, k, v = (x.double().requires_grad_(True) for x in _inputs(B=2, T=7, H=2, H_kv=1, D=3, S=0)[:3])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0, 0]])

    def fn(q, k, v):
        return chunk_sliding_window_attention(q, k, v, 3, attention_mask=mask, chunk_size=2)

    assert torch.autograd.gradcheck(fn, (q, k, v))
    out = fn(q, k, v)
    assert (out[0, :2] == 0).all()


@pytest.mark.parametrize("sinks", [False, True])
def test_attention_over_cache_equals_last_rows_of_full(sinks):
    from hf_arch.kernels.sliding_window import sliding_window_attention_over_cache

    torch.manual_seed(0)
    B, T, H, H_kv, D, window = 2, 11, 4, 2, 8, 4
    q, k, v = torch.randn(B, T, H, D), torch.randn(B, T, H_kv, D), torch.randn(B, T, H_kv, D)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, :3] = 0  # left padding in row 1
    sink = torch.randn(H, 2) if sinks else None
    full = naive_sliding_window_attention(q, k, v, window, sink_logits=sink, attention_mask=mask)
    for Tq, Tk in ((1, 4), (3, 6), (2, 5)):  # keys: the window-1 cached tail plus the new tokens
        got = sliding_window_attention_over_cache(
            q[:, T - Tq:], k[:, T - Tk:], v[:, T - Tk:], window, sink_logits=sink, key_mask=mask[:, T - Tk:]
        )
        torch.testing.assert_close(got, full[:, T - Tq:], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="T_k >= T_q"):
        sliding_window_attention_over_cache(q, k[:, :3], v[:, :3], window)


# -- the softmax mass (LoLCATs' shared denominator) -------------------------------------------------------------

def _mass_by_hand(q, k, window, mask=None):
    """Σ_keys in the window exp(score - row max), from the scores written out."""
    B, T, H, D = q.shape
    kf = k.repeat_interleave(H // k.shape[2], dim=2)
    scores = torch.einsum("bthd,bshd->bhts", q, kf) / D**0.5
    t = torch.arange(T)
    allowed = ((t[:, None] - t[None, :]) >= 0) & ((t[:, None] - t[None, :]) < window)
    allowed = allowed[None, None] & (mask[:, None, None, :] != 0 if mask is not None else True)
    scores = scores.masked_fill(~allowed, float("-inf"))
    mass = torch.exp(scores - scores.amax(-1, keepdim=True)).sum(-1).transpose(1, 2)  # [B, T, H]
    return mass.nan_to_num(0.0)  # a row with no key (padding) has no mass


def test_mass_equals_its_definition_in_every_path_and_its_gradient_matches():
    from hf_arch.kernels.sliding_window import sliding_window_attention_over_cache

    q, k, v, _ = _inputs(T=13, dtype=torch.float64)
    mask = torch.ones(2, 13, dtype=torch.long)
    mask[1, :4] = 0  # left padding
    expected = _mass_by_hand(q, k, 5, mask)
    naive_out, naive_mass = naive_sliding_window_attention(q, k, v, 5, attention_mask=mask, return_mass=True)
    chunk_out, chunk_mass = chunk_sliding_window_attention(q, k, v, 5, attention_mask=mask, return_mass=True,
                                                           chunk_size=4)
    torch.testing.assert_close(naive_out, naive_sliding_window_attention(q, k, v, 5, attention_mask=mask))
    torch.testing.assert_close(chunk_out, naive_out)
    torch.testing.assert_close(naive_mass, expected)
    torch.testing.assert_close(chunk_mass, expected)
    real = mask.bool()[..., None].expand_as(expected)
    assert naive_mass.shape == (2, 13, 4) and (expected[real] >= 1).all() and (expected[~real] == 0).all()
    cached_out, cached_mass = sliding_window_attention_over_cache(q[:, -3:], k[:, -7:], v[:, -7:], 5,
                                                                  key_mask=mask[:, -7:], return_mass=True)
    torch.testing.assert_close(cached_out, naive_out[:, -3:])
    torch.testing.assert_close(cached_mass, expected[:, -3:])

    # The mass is a function of the scores with the row max inside it: its gradient is checked, not detached.
    small = [x[:1, :6, :2, :3].clone().requires_grad_(True) for x in (q, k[:, :, :1], v[:, :, :1])]
    assert torch.autograd.gradcheck(
        lambda q, k, v: chunk_sliding_window_attention(q, k, v, 3, return_mass=True, chunk_size=2), small)
    assert torch.autograd.gradcheck(lambda q, k, v: naive_sliding_window_attention(q, k, v, 3, return_mass=True), small)
