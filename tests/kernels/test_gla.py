"""GLA ops: chunked and fused-recurrent forms against the naive reference (outputs, states, all gradients)."""

from __future__ import annotations

import functools

import pytest
import torch

from hf_arch.kernels.gla import chunk_gla, fused_recurrent_gla, naive_recurrent_gla

IMPLS = {
    "chunk16": functools.partial(chunk_gla, chunk_size=16),
    "chunk48": functools.partial(chunk_gla, chunk_size=48),  # 3 sub-chunks
    "chunk64": chunk_gla,
    "chunk24": functools.partial(chunk_gla, chunk_size=24),  # not a multiple of 16: no secondary chunking
    "recurrent": fused_recurrent_gla,
}
GATES = {
    "weak": (-1.1e-3, -0.9e-3),
    "mixed": (-3.0, 0.0),
    "strong": (-20.0, -5.0),
    "zero": (0.0, 0.0),
}


def rel_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def make_inputs(B, T, H, Dk, Dv, gate, N=None, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    lo, hi = GATES[gate]
    q = torch.randn(B, T, H, Dk, generator=gen)
    k = torch.randn(B, T, H, Dk, generator=gen)
    v = torch.randn(B, T, H, Dv, generator=gen)
    g = torch.rand(B, T, H, Dk, generator=gen) * (hi - lo) + lo
    h0 = torch.randn(N or B, H, Dk, Dv, generator=gen)
    return [x.to(dtype) for x in (q, k, v, g)] + [h0]


def run_with_grads(fn, inputs, dtype, **kwargs):
    """Run ``fn`` on leaf copies of ``inputs`` (h0 stays fp32/fp64); return o, final state and the 5 gradients."""
    q, k, v, g, h0 = (x.detach().clone().requires_grad_(True) for x in inputs)
    cast = [x.to(dtype) if i < 4 else x for i, x in enumerate((q, k, v, g, h0))]
    o, S = fn(*cast[:4], initial_state=cast[4], output_final_state=True, **kwargs)
    gen = torch.Generator().manual_seed(123)
    do = torch.randn(o.shape, generator=gen).to(o.dtype)
    dS = torch.randn(S.shape, generator=gen).to(S.dtype)
    ((o * do).sum() + (S * dS).sum()).backward()
    return o, S, [x.grad for x in (q, k, v, g, h0)]


def check_against_naive(fn, inputs, dtype=torch.float32, tol=1e-4, **kwargs):
    ref_o, ref_S, ref_grads = run_with_grads(naive_recurrent_gla, inputs, torch.float64, **kwargs)
    o, S, grads = run_with_grads(fn, inputs, dtype, **kwargs)
    assert o.dtype == dtype and S.dtype == torch.float32
    assert torch.isfinite(o).all() and torch.isfinite(S).all()
    assert rel_rms(o, ref_o) < tol, ("o", rel_rms(o, ref_o))
    assert rel_rms(S, ref_S) < tol, ("final_state", rel_rms(S, ref_S))
    for name, a, b in zip(("dq", "dk", "dv", "dg", "dh0"), grads, ref_grads):
        assert torch.isfinite(a).all(), name
        assert rel_rms(a, b) < tol, (name, rel_rms(a, b))


@pytest.mark.parametrize("impl", sorted(IMPLS))
@pytest.mark.parametrize("gate", sorted(GATES))
def test_matches_naive_awkward_shape(impl, gate):
    # T=37 (not a multiple of any chunk size), D_k=24, D_v=20 (not powers of 2).
    check_against_naive(IMPLS[impl], make_inputs(2, 37, 2, 24, 20, gate))


@pytest.mark.parametrize("impl", sorted(IMPLS))
def test_single_step_decode(impl):
    # T=1 with the state from a cache: the decode path.
    check_against_naive(IMPLS[impl], make_inputs(3, 1, 2, 8, 12, "mixed"))


@pytest.mark.parametrize("impl", ["chunk64", "recurrent"])
def test_longer_sequence_multiple_chunks(impl):
    check_against_naive(IMPLS[impl], make_inputs(1, 150, 1, 16, 8, "mixed", seed=1))


@pytest.mark.parametrize("impl", ["chunk64", "recurrent"])
def test_fp16_inputs(impl):
    check_against_naive(IMPLS[impl], make_inputs(1, 40, 2, 16, 16, "mixed", seed=2), dtype=torch.float16, tol=5e-3)


@pytest.mark.parametrize("impl", ["chunk64", "recurrent"])
def test_bf16_output_dtype_and_fp32_state(impl):
    q, k, v, g, h0 = make_inputs(1, 20, 2, 8, 8, "mixed", dtype=torch.bfloat16)
    o, S = IMPLS[impl](q, k, v, g, initial_state=h0, output_final_state=True)
    assert o.dtype == torch.bfloat16 and S.dtype == torch.float32
    ref_o, ref_S = naive_recurrent_gla(q, k, v, g, initial_state=h0, output_final_state=True)
    assert rel_rms(o, ref_o) < 1e-2 and rel_rms(S, ref_S) < 1e-4


@pytest.mark.parametrize("impl", sorted(IMPLS))
def test_extreme_gates_stay_finite(impl):
    # exp(-b) would overflow fp32 after a handful of steps here; every evaluated exponent must be <= 0.
    q, k, v, g, h0 = make_inputs(1, 37, 2, 8, 8, "strong")
    g = g * 50.0  # g in [-1000, -250]
    check_against_naive(IMPLS[impl], [q, k, v, g, h0])


@pytest.mark.parametrize("impl", sorted(IMPLS))
def test_no_initial_state_and_no_final_state(impl):
    q, k, v, g, _ = make_inputs(2, 19, 2, 8, 8, "mixed")
    o, S = IMPLS[impl](q, k, v, g)
    assert S is None
    ref, _ = naive_recurrent_gla(q.double(), k.double(), v.double(), g.double())
    assert rel_rms(o, ref) < 1e-5
    # an explicit scale
    o, _ = IMPLS[impl](q, k, v, g, scale=0.3)
    ref, _ = naive_recurrent_gla(q.double(), k.double(), v.double(), g.double(), scale=0.3)
    assert rel_rms(o, ref) < 1e-5


def test_zero_gate_is_plain_linear_attention():
    q, k, v, _, _ = make_inputs(1, 10, 1, 4, 3, "zero")
    o, _ = naive_recurrent_gla(q, k, v, torch.zeros_like(q), scale=1.0)
    scores = (q[0, :, 0] @ k[0, :, 0].T).tril()
    assert torch.allclose(o[0, :, 0], scores @ v[0, :, 0], atol=1e-5)


@pytest.mark.parametrize("impl", ["naive"] + sorted(IMPLS))
def test_cu_seqlens_equals_separate_runs(impl):
    fn = naive_recurrent_gla if impl == "naive" else IMPLS[impl]
    lengths = [5, 1, 21, 0, 9]  # a length-1 and an empty sequence
    cu = torch.tensor([0] + lengths).cumsum(0)
    q, k, v, g, h0 = make_inputs(1, sum(lengths), 2, 8, 6, "mixed", N=len(lengths))
    o, S = fn(q, k, v, g, initial_state=h0, output_final_state=True, cu_seqlens=cu)
    assert o.shape == v.shape and S.shape == h0.shape
    for i, (start, n) in enumerate(zip(cu[:-1].tolist(), lengths)):
        sl = slice(start, start + n)
        o_i, S_i = naive_recurrent_gla(
            q[:, sl].double(), k[:, sl].double(), v[:, sl].double(), g[:, sl].double(),
            initial_state=h0[i : i + 1].double(), output_final_state=True,
        )
        if n:
            assert rel_rms(o[:, sl], o_i) < 1e-5, i
        assert rel_rms(S[i : i + 1], S_i) < 1e-5, i


@pytest.mark.parametrize("impl", ["chunk16", "chunk64", "recurrent"])
def test_cu_seqlens_gradients(impl):
    lengths = [7, 1, 30]
    cu = torch.tensor([0] + lengths).cumsum(0)
    inputs = make_inputs(1, sum(lengths), 2, 8, 6, "mixed", N=len(lengths))
    check_against_naive(IMPLS[impl], inputs, cu_seqlens=cu)


@pytest.mark.parametrize("impl", sorted(IMPLS))
def test_state_chaining_equals_full_run(impl):
    # Chunked prefill: two halves with the state passed on give the full run's outputs and final state.
    fn = IMPLS[impl]
    q, k, v, g, h0 = make_inputs(2, 45, 2, 8, 8, "mixed")
    o, S = fn(q, k, v, g, initial_state=h0, output_final_state=True)
    o1, S1 = fn(q[:, :23], k[:, :23], v[:, :23], g[:, :23], initial_state=h0, output_final_state=True)
    o2, S2 = fn(q[:, 23:], k[:, 23:], v[:, 23:], g[:, 23:], initial_state=S1, output_final_state=True)
    assert rel_rms(torch.cat([o1, o2], 1), o) < 1e-5
    assert rel_rms(S2, S) < 1e-5


def test_recurrent_decode_continues_chunk_prefill():
    q, k, v, g, h0 = make_inputs(1, 33, 2, 8, 8, "mixed")
    o, S = naive_recurrent_gla(q, k, v, g, initial_state=h0, output_final_state=True)
    _, S_pre = chunk_gla(q[:, :32], k[:, :32], v[:, :32], g[:, :32], initial_state=h0, output_final_state=True)
    o_last, S_last = fused_recurrent_gla(q[:, 32:], k[:, 32:], v[:, 32:], g[:, 32:], initial_state=S_pre,
                                         output_final_state=True)
    assert rel_rms(o_last, o[:, 32:]) < 1e-5 and rel_rms(S_last, S) < 1e-5


@pytest.mark.parametrize("fn", [naive_recurrent_gla, chunk_gla, fused_recurrent_gla])
def test_bad_inputs_raise(fn):
    q, k, v, g, h0 = make_inputs(2, 6, 2, 8, 4, "mixed")
    with pytest.raises(ValueError, match="k shape"):
        fn(q, k[..., :4], v, g)
    with pytest.raises(ValueError, match="g shape"):
        fn(q, k, v, g[:, :5])
    with pytest.raises(ValueError, match="v shape"):
        fn(q, k, v[:, :5], g)
    with pytest.raises(ValueError, match="4-D"):
        fn(q[0], k[0], v[0], g[0])
    with pytest.raises(ValueError, match="dtype"):
        fn(q, k.double(), v, g)
    with pytest.raises(ValueError, match="g dtype"):
        fn(q, k, v, g.half())
    with pytest.raises(ValueError, match="initial_state shape"):
        fn(q, k, v, g, initial_state=h0[:1])
    with pytest.raises(ValueError, match="initial_state shape"):
        fn(q, k, v, g, initial_state=h0.transpose(-1, -2))
    with pytest.raises(ValueError, match="batch size must be 1"):
        fn(q, k, v, g, cu_seqlens=torch.tensor([0, 3, 6]))
    q1, k1, v1, g1 = q[:1], k[:1], v[:1], g[:1]
    with pytest.raises(ValueError, match="end at T"):
        fn(q1, k1, v1, g1, cu_seqlens=torch.tensor([0, 3, 5]))
    with pytest.raises(ValueError, match="non-decreasing"):
        fn(q1, k1, v1, g1, cu_seqlens=torch.tensor([0, 4, 2, 6]))
    with pytest.raises(ValueError, match="start at 0"):
        fn(q1, k1, v1, g1, cu_seqlens=torch.tensor([1, 6]))
    with pytest.raises(ValueError, match="integer"):
        fn(q1, k1, v1, g1, cu_seqlens=torch.tensor([0.0, 6.0]))
    with pytest.raises(ValueError, match="initial_state shape"):  # N = number of sequences with cu_seqlens
        fn(q1, k1, v1, g1, initial_state=h0[:1], cu_seqlens=torch.tensor([0, 2, 6]))


def test_chunk_size_validation():
    q, k, v, g, _ = make_inputs(1, 4, 1, 4, 4, "mixed")
    with pytest.raises(ValueError, match="chunk_size"):
        chunk_gla(q, k, v, g, chunk_size=0)
