"""Kimi Delta Attention: chunk and recurrent paths against the step-by-step reference (tiny shapes, fast).

Most comparisons run in float64 (every path computes in fp64 when an input is fp64), so the tolerances are tight;
each covers o, the final state and the gradients of q, k, v, g, beta and initial_state.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

import hf_arch.kernels.kda as kda_pkg
from hf_arch.kernels.delta_rule import chunk_gated_delta_rule
from hf_arch.kernels.kda import chunk_kda, fused_recurrent_kda, kda, naive_recurrent_kda

NAMES = ("q", "k", "v", "g", "beta", "initial_state")


def rel_rms(ref: torch.Tensor, got: torch.Tensor) -> float:
    """||ref - got|| / ||ref|| in float64 (no absolute floor); a NaN or inf fails outright."""
    assert torch.isfinite(got).all(), "non-finite value in result"
    ref, got = ref.double(), got.double()
    diff = (ref - got).norm().item()
    return 0.0 if diff == 0.0 else diff / max(ref.norm().item(), 1e-30)


def assert_close(name: str, ref: torch.Tensor, got: torch.Tensor, tol: float) -> None:
    assert ref.shape == got.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    err = rel_rms(ref, got)
    assert err <= tol, f"{name}: relative RMS error {err:.3e} > {tol:.1e}"


def make_inputs(B=2, T=37, H=2, K=24, V=20, dtype=torch.float64, gate="normal", h0=True, N=None, raw_k=False,
                seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, K, generator=gen, dtype=torch.float64)
    k = torch.randn(B, T, H, K, generator=gen, dtype=torch.float64)
    if raw_k:  # no in-op L2 norm: keep |k|^2 beta < 2 by hand (the stable regime of the delta rule)
        k = 1.2 * F.normalize(k, dim=-1)
    v = torch.randn(B, T, H, V, generator=gen, dtype=torch.float64)
    x = torch.randn(B, T, H, K, generator=gen, dtype=torch.float64)
    u = torch.rand(B, T, H, K, generator=gen, dtype=torch.float64)
    g = {
        "normal": lambda: F.logsigmoid(x),  # per channel, mostly in [-3, 0]
        "weak": lambda: F.logsigmoid(x) / 100,
        "strong": lambda: -5.0 - 15.0 * u,  # g in [-20, -5]
        "extreme": lambda: -250.0 - 750.0 * u,  # exp(g) underflows to 0 even in fp64 after a couple of steps
        "zero": lambda: torch.zeros_like(x),  # no decay at all
        # rare huge spikes on single channels: a chunk form subtracting long cumsums loses precision here
        "spikes": lambda: torch.where(u < 0.05, -1000.0, F.logsigmoid(x) / 10),
        # some channels forget at once, the others keep everything: per-channel decay at its most visible
        "split": lambda: torch.where(torch.arange(K) < K // 2, -30.0, 0.0).expand(B, T, H, K).clone(),
    }[gate]()
    beta = torch.sigmoid(torch.randn(B, T, H, generator=gen, dtype=torch.float64))
    tensors = dict(q=q.to(dtype), k=k.to(dtype), v=v.to(dtype), g=g.to(torch.float64 if dtype == torch.float64 else
                   torch.float32), beta=beta.to(dtype))
    if h0:
        tensors["initial_state"] = torch.randn(N or B, H, K, V, generator=gen, dtype=torch.float64).to(
            torch.float64 if dtype == torch.float64 else torch.float32
        )
    return tensors


def run_with_grads(fn, inputs, seed=1, **kwargs):
    """Forward, then backward of (o * do).sum() + (ht * dht).sum(); returns (o, ht, {name: grad})."""
    leaves = {n: t.detach().clone().requires_grad_(True) for n, t in inputs.items()}
    o, ht = fn(**leaves, output_final_state=True, **kwargs)
    gen = torch.Generator().manual_seed(seed)
    do = torch.randn(o.shape, generator=gen, dtype=torch.float64)
    dht = torch.randn(ht.shape, generator=gen, dtype=torch.float64)
    ((o.double() * do).sum() + (ht.double() * dht).sum()).backward()
    return o.detach(), ht.detach(), {n: t.grad for n, t in leaves.items()}


def compare(fn, inputs, tol, grad_tol=None, **kwargs):
    """``fn`` against the naive reference run in float64 on the same values."""
    ref_inputs = {n: t.detach().double() for n, t in inputs.items()}
    o_ref, h_ref, g_ref = run_with_grads(naive_recurrent_kda, ref_inputs, **kwargs)
    o, h, grads = run_with_grads(fn, inputs, **kwargs)
    assert o.dtype == inputs["q"].dtype
    assert h.dtype == (torch.float64 if inputs["q"].dtype == torch.float64 else torch.float32)
    assert_close("o", o_ref, o, tol)
    assert_close("final_state", h_ref, h, tol)
    for name in g_ref:
        assert grads[name] is not None, f"no gradient for {name}"
        assert grads[name].dtype == inputs[name].dtype, f"d{name} dtype {grads[name].dtype}"
        assert_close(f"d{name}", g_ref[name], grads[name], grad_tol or tol)


FNS = {
    "chunk64": chunk_kda,  # the default: 6 halving levels in _kda_decayed_pairs
    "chunk48": functools.partial(chunk_kda, chunk_size=48),  # not a power of two: every chunk padded to 64
    "chunk16": functools.partial(chunk_kda, chunk_size=16),
    "chunk5": functools.partial(chunk_kda, chunk_size=5),  # padded to 8; many chunks in the cross-chunk scan
    "recurrent": fused_recurrent_kda,
}


@pytest.mark.parametrize("fn", FNS.values(), ids=FNS.keys())
@pytest.mark.parametrize("l2", [False, True], ids=["raw", "l2norm"])
@pytest.mark.parametrize("T", [1, 37, 70])  # decode step; T not a multiple of any chunk size; more than one chunk
def test_matches_naive_fp64(fn, l2, T):
    inputs = make_inputs(B=2, T=T, raw_k=not l2)
    compare(fn, inputs, 1e-11, use_qk_l2norm=l2)


@pytest.mark.parametrize("fn", FNS.values(), ids=FNS.keys())
def test_matches_naive_fp32(fn):
    compare(fn, make_inputs(B=2, T=37, dtype=torch.float32, seed=2), 2e-5, use_qk_l2norm=True)


@pytest.mark.parametrize("fn", [chunk_kda, fused_recurrent_kda], ids=["chunk", "recurrent"])
def test_fp16_inputs_fp32_state(fn):
    inputs = make_inputs(B=1, T=37, dtype=torch.float16, seed=4)
    compare(fn, inputs, 2e-3, grad_tol=5e-3, use_qk_l2norm=True)


@pytest.mark.parametrize("fn", FNS.values(), ids=FNS.keys())
@pytest.mark.parametrize("gate", ["weak", "strong", "extreme", "zero", "split", "spikes"])
def test_gates(fn, gate):
    compare(fn, make_inputs(B=1, T=37, gate=gate, seed=3), 1e-11, use_qk_l2norm=True)


@pytest.mark.parametrize("fn", FNS.values(), ids=FNS.keys())
@pytest.mark.parametrize("gate", ["extreme", "spikes"])
def test_strong_gates_in_fp32(fn, gate):
    # The chunk form never evaluates exp of a positive exponent (with g in [-1000, -250] exp(-b) would be inf), and
    # its exponents are sums of g over the span they cover: spikes of -1000 cost no precision (fp32 as recurrent).
    inputs = make_inputs(B=1, T=70, gate=gate, dtype=torch.float32, seed=5)
    compare(fn, inputs, 2e-6 if gate == "spikes" else 1e-5, grad_tol=1e-5, use_qk_l2norm=True)


def test_per_channel_decay_is_not_the_scalar_rule():
    """A g that varies across K gives another result than its mean over K; a g constant across K is exactly the
    scalar gated delta rule."""
    inputs = {n: t.detach() for n, t in make_inputs(B=1, T=37, seed=6).items()}
    o, h = chunk_kda(**inputs, output_final_state=True, use_qk_l2norm=True)
    mean_g = inputs["g"].mean(-1, keepdim=True).expand_as(inputs["g"])
    o_mean, h_mean = chunk_kda(**{**inputs, "g": mean_g}, output_final_state=True, use_qk_l2norm=True)
    assert rel_rms(o, o_mean) > 0.05 and rel_rms(h, h_mean) > 0.05

    scalar = {**inputs, "g": inputs["g"][..., 0]}
    o_gdr, h_gdr = chunk_gated_delta_rule(**scalar, output_final_state=True, use_qk_l2norm=True)
    for fn in (chunk_kda, fused_recurrent_kda, naive_recurrent_kda):
        o_b, h_b = fn(**{**inputs, "g": scalar["g"][..., None].expand_as(inputs["g"])}, output_final_state=True,
                      use_qk_l2norm=True)
        # (the delta-rule ops compute in fp32 even for fp64 inputs)
        assert_close("o vs scalar rule", o_gdr, o_b, 1e-5)
        assert_close("state vs scalar rule", h_gdr, h_b, 1e-5)


@pytest.mark.parametrize("fn", FNS.values(), ids=FNS.keys())
def test_no_initial_state_and_explicit_scale(fn):
    compare(fn, make_inputs(B=2, T=21, K=8, V=12, h0=False, seed=7), 1e-11, use_qk_l2norm=True, scale=0.3)


@pytest.mark.parametrize("fn", [*FNS.values(), naive_recurrent_kda], ids=[*FNS.keys(), "naive"])
def test_cu_seqlens_equals_separate_runs(fn):
    """Packed sequences of lengths 5, 1, 0, 20, 11: each from its own initial state, like separate naive runs."""
    cu = torch.tensor([0, 5, 6, 6, 26, 37])
    inputs = make_inputs(B=1, T=37, N=5, seed=8)
    o, ht, grads = run_with_grads(fn, inputs, cu_seqlens=cu, use_qk_l2norm=True)
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
    assert_close("o", o_sep.detach(), o, 1e-11)
    assert_close("final_state", h_sep.detach(), ht, 1e-11)
    torch.testing.assert_close(ht[2], inputs["initial_state"][2])  # the empty sequence keeps its state
    gen = torch.Generator().manual_seed(1)  # the same upstream gradients as run_with_grads
    do = torch.randn(o.shape, generator=gen, dtype=torch.float64)
    dht = torch.randn(ht.shape, generator=gen, dtype=torch.float64)
    ((o_sep * do).sum() + (h_sep * dht).sum()).backward()
    for name, t in leaves.items():
        assert_close(f"d{name}", t.grad, grads[name], 1e-11)


def test_cu_seqlens_without_initial_state():
    cu = torch.tensor([0, 17, 40])
    inputs = make_inputs(B=1, T=40, h0=False, seed=9)
    o, ht = chunk_kda(**inputs, cu_seqlens=cu, output_final_state=True)
    assert ht.shape == (2, 2, 24, 20)
    for n, (s, e) in enumerate(((0, 17), (17, 40))):
        o_n, h_n = naive_recurrent_kda(**{name: t[:, s:e] for name, t in inputs.items()}, output_final_state=True)
        assert_close(f"o[{n}]", o_n, o[:, s:e], 1e-11)
        assert_close(f"state[{n}]", h_n[0], ht[n], 1e-11)


@pytest.mark.parametrize("fn", FNS.values(), ids=FNS.keys())
def test_two_halves_chain_equals_full(fn):
    """Chunked prefill: the state handed from one call to the next gives the full run's outputs and final state."""
    inputs = {n: t.detach() for n, t in make_inputs(B=2, T=45, seed=10).items()}
    o_full, h_full = fn(**inputs, output_final_state=True, use_qk_l2norm=True)
    first = {n: t[:, :23] for n, t in inputs.items() if n != "initial_state"}
    second = {n: t[:, 23:] for n, t in inputs.items() if n != "initial_state"}
    o1, h1 = fn(**first, initial_state=inputs["initial_state"], output_final_state=True, use_qk_l2norm=True)
    o2, h2 = fn(**second, initial_state=h1, output_final_state=True, use_qk_l2norm=True)
    assert_close("o", o_full, torch.cat([o1, o2], 1), 1e-11)
    assert_close("final_state", h_full, h2, 1e-11)


def test_chunk_size_does_not_change_result():
    inputs = {n: t.detach() for n, t in make_inputs(B=1, T=70, seed=11).items()}
    ref, h_ref = chunk_kda(**inputs, output_final_state=True, use_qk_l2norm=True, chunk_size=64)
    for c in (1, 7, 16, 32, 128):
        o, h = chunk_kda(**inputs, output_final_state=True, use_qk_l2norm=True, chunk_size=c)
        assert_close(f"o(chunk={c})", ref, o, 1e-11)
        assert_close(f"state(chunk={c})", h_ref, h, 1e-11)


def test_chunk_keeps_no_chunk_sized_pairwise_decays():
    """Memory: no [C, C, K] tensor of pairwise per-channel decays is built or kept for backward; the largest saved
    tensors are the two [C, C] matrices (q-k and k-k) of a chunk."""
    C, K = 64, 32
    inputs = make_inputs(B=1, T=C, H=1, K=K, V=4, seed=12)
    leaves = {n: t.detach().clone().requires_grad_(True) for n, t in inputs.items()}
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        chunk_kda(**leaves, chunk_size=C)
    assert saved and max(saved) <= 2 * C * C < C * C * K, max(saved)


def test_no_final_state_when_not_requested_and_empty_input():
    inputs = {n: t.detach() for n, t in make_inputs(B=1, T=4, seed=13).items()}
    for fn in (*FNS.values(), naive_recurrent_kda):
        o, ht = fn(**inputs)
        assert ht is None and o.shape == (1, 4, 2, 20)
    empty = {n: (t[:, :0] if n != "initial_state" else t) for n, t in inputs.items()}
    for fn in (chunk_kda, fused_recurrent_kda, naive_recurrent_kda):
        o, ht = fn(**empty, output_final_state=True)
        assert o.shape == (1, 0, 2, 20)
        torch.testing.assert_close(ht, inputs["initial_state"])


@pytest.mark.parametrize("T", [3, 8, 9, 30])  # around RECURRENT_MAX_TOKENS = 8: recurrent, then chunked
def test_public_op_torch_backend(T, monkeypatch):
    called = []

    def spy(name):
        real = getattr(kda_pkg, name)

        def wrapper(*args, **kwargs):
            called.append(name)
            return real(*args, **kwargs)

        return wrapper

    for name in ("chunk_kda", "fused_recurrent_kda"):
        monkeypatch.setattr(kda_pkg, name, spy(name))
    inputs = make_inputs(B=1, T=T, seed=14)
    compare(functools.partial(kda, backend="torch"), inputs, 1e-11, use_qk_l2norm=True)
    assert set(called) == {"fused_recurrent_kda" if T <= 8 else "chunk_kda"}
    with pytest.raises(ValueError, match="backend 'cuda_graph' is not available"):
        kda(**{n: t.detach() for n, t in inputs.items()}, backend="cuda_graph")


# --- transformers' own pure-PyTorch KDA (Kimi Linear) ------------------------------------------------------------


def _kimi_linear_fallbacks():
    modeling = pytest.importorskip(
        "transformers.models.kimi_linear.modeling_kimi_linear",
        reason="this transformers has no Kimi Linear model (transformers.models.kimi_linear)",
    )
    fns = [getattr(modeling, name, None) for name in ("chunk_kimi_delta_attention", "recurrent_kimi_delta_attention")]
    if None in fns:
        pytest.skip("transformers' kimi_linear has no chunk_kimi_delta_attention / recurrent_kimi_delta_attention")
    # Hub-kernel wrappers around the pure-torch functions: on CPU (fla absent or CPU tensors) they run the torch path.
    return [getattr(fn, "__wrapped__", fn) for fn in fns]


@pytest.mark.parametrize("l2", [True, False], ids=["l2norm", "raw"])
def test_matches_transformers_kimi_delta_attention(l2):
    hf_chunk, hf_recurrent = _kimi_linear_fallbacks()
    # transformers takes [B, T, H, D] and g [B, T, H, K] like fla (its chunk form transposes internally), fixes the
    # scale at K**-0.5 (no scale argument: extra kwargs are swallowed), calls the l2norm flag
    # use_qk_l2norm_in_kernel (x / sqrt(sum x^2 + 1e-6), same as ours), computes in fp32 and returns the state fp32.
    inputs = {n: t.detach() for n, t in make_inputs(B=2, T=37, K=16, V=16, dtype=torch.float32, raw_k=not l2,
                                                     seed=15).items()}
    q, k, v, g, beta, h0 = (inputs[n] for n in NAMES)
    o, h = chunk_kda(**inputs, output_final_state=True, use_qk_l2norm=l2)

    o_c, h_c = hf_chunk(q, k, v, g, beta, chunk_size=16, initial_state=h0, output_final_state=True,
                        use_qk_l2norm_in_kernel=l2)
    assert_close("o vs chunk_kimi_delta_attention", o_c, o, 1e-5)
    assert_close("state vs chunk_kimi_delta_attention", h_c, h, 1e-5)
    # recurrent_kimi_delta_attention: initial_state and output_final_state are required positional arguments.
    o_r, h_r = hf_recurrent(q, k, v, g, beta, h0, True, use_qk_l2norm_in_kernel=l2)
    assert_close("o vs recurrent_kimi_delta_attention", o_r, o, 1e-5)
    assert_close("state vs recurrent_kimi_delta_attention", h_r, h, 1e-5)


def test_gradients_match_transformers_chunk_kimi_delta_attention():
    hf_chunk, _ = _kimi_linear_fallbacks()
    inputs = make_inputs(B=1, T=21, H=2, K=16, V=16, dtype=torch.float32, seed=16)

    def hf(q, k, v, g, beta, initial_state, output_final_state):
        return hf_chunk(q, k, v, g, beta, chunk_size=16, initial_state=initial_state,
                        output_final_state=output_final_state, use_qk_l2norm_in_kernel=True)

    o_ref, h_ref, g_ref = run_with_grads(hf, inputs)
    o, h, grads = run_with_grads(chunk_kda, inputs, use_qk_l2norm=True)
    assert_close("o", o_ref, o, 1e-5)
    assert_close("final_state", h_ref, h, 1e-5)
    for name in NAMES:
        assert_close(f"d{name}", g_ref[name], grads[name], 1e-4)


# --- input validation -------------------------------------------------------------------------------------------


def _good():
    return {n: t.detach() for n, t in make_inputs(B=1, T=5, K=4, V=3, seed=17).items()}


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda d: d.update(k=d["k"][..., :3]), r"k must have the shape of q"),
        (lambda d: d.update(q=d["q"][0]), r"q must be 4-D"),
        (lambda d: d.update(v=d["v"][:, :4]), r"v must be 4-D \[B, T, H, V\]"),
        (lambda d: d.update(v=torch.zeros(1, 5, 4, 3, dtype=torch.float64)), r"v must be 4-D \[B, T, H, V\]"),
        (lambda d: d.update(g=d["g"][..., 0]), r"g must have shape \[B, T, H, K\] = \(1, 5, 2, 4\).*per key channel"),
        (lambda d: d.update(g=d["g"][..., :2]), r"g must have shape \[B, T, H, K\]"),
        (lambda d: d.update(beta=d["beta"][..., None]), r"beta must have shape \[B, T, H\]"),
        (lambda d: d.update(v=d["v"].float()), r"share a dtype"),
        (lambda d: d.update(g=torch.zeros(1, 5, 2, 4, dtype=torch.long)), r"g must be a floating-point"),
        (lambda d: d.update(scale="0.5"), r"scale must be a number"),
        (lambda d: d.update(initial_state=d["initial_state"][..., :2]), r"initial_state must have shape \[N, H, K"),
        (lambda d: d.update(cu_seqlens=torch.tensor([0, 2, 4])), r"cu_seqlens must start at 0 and end at T=5"),
        (lambda d: d.update(cu_seqlens=torch.tensor([0, 4, 2, 5])), r"non-decreasing"),
        (lambda d: d.update(cu_seqlens=torch.tensor([0.0, 5.0])), r"cu_seqlens must be a 1-D integer"),
        (lambda d: d.update(cu_seqlens=torch.tensor([0, 2, 5])), r"initial_state must have shape .* = \(2, 2,"),
    ],
    ids=["k-shape", "q-dims", "v-time", "v-heads", "g-scalar", "g-shape", "beta-shape", "dtype", "g-int", "scale",
         "h0-shape", "cu-end", "cu-order", "cu-float", "h0-vs-cu"],
)
@pytest.mark.parametrize("fn", [chunk_kda, fused_recurrent_kda, naive_recurrent_kda, kda],
                         ids=["chunk", "recurrent", "naive", "op"])
def test_bad_inputs_raise(fn, change, match):
    args = _good()
    change(args)
    with pytest.raises(ValueError, match=match):
        fn(**args)


def test_cu_seqlens_requires_batch_one_and_chunk_size_positive():
    args = {n: t.detach() for n, t in make_inputs(B=2, T=5, K=4, V=3, h0=False, seed=18).items()}
    with pytest.raises(ValueError, match="batch size must be 1"):
        chunk_kda(**args, cu_seqlens=torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="chunk_size"):
        chunk_kda(**args, chunk_size=0)


def test_benchmark_rows():
    """KDA declares its rows in ``hf-arch bench kernels`` (kernels/kda/benchmark.py): ours against transformers'
    fallback on the same inputs, with the speedup column filled."""
    from hf_arch.recipes.kernel_benchmark import benchmark_kernels, format_kernel_table

    rows = benchmark_kernels(seq_lens=(24, 40), heads=1, head_dim=16, repeats=1, progress=False, ops=("kda",))
    impls = {"hf_arch.torch"}
    try:
        import transformers.models.kimi_linear.modeling_kimi_linear  # noqa: F401

        impls.add("transformers")
    except ImportError:
        pass
    assert {r["impl"] for r in rows} == impls and len(rows) == 2 * len(impls)
    for row in rows:
        assert "skipped" not in row and row["fwd_ms"] > 0 and row["fwdbwd_ms"] > 0, row
    ours = [line for line in format_kernel_table(rows).splitlines() if line.startswith("| kda | hf_arch.torch | 24 |")]
    assert len(ours) == 1
    if "transformers" in impls:
        assert float(ours[0].strip("|").split("|")[5]) > 0
