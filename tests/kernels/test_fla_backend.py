"""The fla backend's argument mapping, on CPU, against fla's own pure-PyTorch references.

fla's Triton kernels need a GPU, so each test swaps the kernel our adapter loads for a stand-in that (1) binds the
call to the real fla kernel's signature, so a wrong keyword (fla's kernels swallow unknown ones in ``**kwargs``), a
missing one or a positional slip fails here, and (2)
computes what that kernel documents with fla's naive recurrent reference (``fla.ops.*.naive``): fla's L2 norm, GVA
head grouping, ``cu_seqlens`` packing and per-sequence states. The adapters' outputs must then equal our PyTorch ops.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import types

import pytest
import torch

from hf_arch.kernels import dispatch, fla_backend, ops
from hf_arch.kernels.kda import kda

fla_gla_naive = pytest.importorskip("fla.ops.gla.naive", reason="fla-core (the dev extra) is not installed")
fla_gdn_naive = importlib.import_module("fla.ops.gated_delta_rule.naive")
fla_kda_naive = importlib.import_module("fla.ops.kda.naive")
fla_simple_gla_naive = importlib.import_module("fla.ops.simple_gla.naive")

ATOL = 2e-5


def _fla_l2norm(x):  # fla.modules.l2norm: x / sqrt(sum(x^2) + 1e-6), eps inside the root
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + 1e-6)


def _per_sequence(run, args, cu_seqlens, initial_state):
    """Run ``run(tensors, h0) -> (o, h)`` on each packed sequence of the batch-of-one ``args`` (or per batch row)."""
    if cu_seqlens is None:
        return run(args, initial_state)
    outs, states = [], []
    bounds = cu_seqlens.tolist()
    for n, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        h0 = None if initial_state is None else initial_state[n:n + 1]
        o, h = run({name: t[:, start:end] for name, t in args.items()}, h0)
        outs.append(o)
        states.append(h)
    return torch.cat(outs, dim=1), torch.cat(states) if states[0] is not None else None


def _gla_reference(bound):
    a = bound.arguments
    gate = a.get("g", a.get("gk"))
    K = a["q"].shape[-1]
    scale = a.get("scale") or K ** -0.5

    def run(t, h0):  # the naive reference has no scale argument: it always uses K ** -0.5
        return fla_gla_naive.naive_recurrent_gla(t["q"] * (scale / K ** -0.5), t["k"], t["v"], t["g"], initial_state=h0,
                                                 output_final_state=a.get("output_final_state", False))

    return _per_sequence(run, {"q": a["q"], "k": a["k"], "v": a["v"], "g": gate}, a.get("cu_seqlens"),
                         a.get("initial_state"))


def _lightning_reference(bound):
    a = bound.arguments
    per_head = a.get("g_gamma")
    assert (per_head is None) != (a.get("g") is None)  # one of the two, never both
    assert (per_head if per_head is not None else a["g"]).dtype == torch.float32

    def run(t, h0):  # fla's simple_gla reference takes the decay per token: g_gamma broadcast
        B, T, H, _ = t["q"].shape
        g = per_head.expand(B, T, H).contiguous() if per_head is not None else t["g"]
        scale = a.get("scale") or t["q"].shape[-1] ** -0.5
        return fla_simple_gla_naive.naive_recurrent_simple_gla(t["q"], t["k"], t["v"], g, scale=scale,
                                                                initial_state=h0,
                                                                output_final_state=a.get("output_final_state"))

    tensors = {"q": a["q"], "k": a["k"], "v": a["v"], **({"g": a["g"]} if a.get("g") is not None else {})}
    return _per_sequence(run, tensors, a.get("cu_seqlens"), a.get("initial_state"))


def _delta_reference(bound, per_channel: bool):
    a = bound.arguments
    q, k = a["q"], a["k"]
    if a.get("use_qk_l2norm_in_kernel", False):
        q, k = _fla_l2norm(q.float()).to(q.dtype), _fla_l2norm(k.float()).to(k.dtype)
    final = a.get("output_final_state", False)

    def run(t, h0):
        if per_channel:
            return fla_kda_naive.naive_recurrent_kda(t["q"], t["k"], t["v"], t["g"], t["beta"], scale=a.get("scale"),
                                                     initial_state=h0, output_final_state=final)
        group = t["v"].shape[2] // t["q"].shape[2]  # GVA: value head h reads q/k head h // group
        qq, kk = (x.repeat_interleave(group, dim=2) for x in (t["q"], t["k"]))
        o, h = fla_gdn_naive.naive_recurrent_gated_delta_rule(qq, kk, t["v"], t["beta"], t["g"], scale=a.get("scale"),
                                                              initial_state=h0, output_final_state=final)
        return o.to(t["v"].dtype), h

    tensors = {"q": q, "k": k, "v": a["v"], "g": a["g"], "beta": a["beta"]}
    return _per_sequence(run, tensors, a.get("cu_seqlens"), a.get("initial_state"))


@pytest.fixture
def fla_kernels(monkeypatch):
    """Replace fla's kernels with signature-checked naive stand-ins; records which kernel each call used."""
    calls = []

    def load(op, recurrent):
        real = fla_backend.FLA_KERNELS[op]
        real_fn = getattr(importlib.import_module(real[0]), real[2] if recurrent else real[1])

        def stand_in(*args, **kwargs):
            signature = inspect.signature(real_fn)
            bound = signature.bind(*args, **kwargs)  # a TypeError here is a mapping bug
            # fla's kernels take **kwargs and ignore what they do not know: a misspelt flag would vanish silently
            swallowed = [name for p in signature.parameters.values() if p.kind is p.VAR_KEYWORD
                         for name in bound.arguments.get(p.name, {})]
            if swallowed:
                raise TypeError(f"{real_fn.__name__} does not name {swallowed}; fla would ignore them")
            calls.append((op, real_fn.__name__))
            if op == "gla":
                return _gla_reference(bound)
            if op == "lightning":
                return _lightning_reference(bound)
            return _delta_reference(bound, per_channel=op == "kda")

        return stand_in

    monkeypatch.setattr(fla_backend, "load_fla_kernel", load)
    return calls


def _inputs(B, T, H, K, V, HV=None, seed=0, per_channel=False):
    gen = torch.Generator().manual_seed(seed)
    HV = HV or H
    q = torch.randn(B, T, H, K, generator=gen)
    k = torch.randn(B, T, H, K, generator=gen)
    v = torch.randn(B, T, HV, V, generator=gen)
    g_shape = (B, T, HV, K) if per_channel else (B, T, HV)
    g = -torch.rand(g_shape, generator=gen) * 0.5
    beta = torch.rand(B, T, HV, generator=gen)
    h0 = torch.randn(B, HV, K, V, generator=gen) * 0.1
    return q, k, v, g, beta, h0


def _adapter(op):
    return fla_backend.fla_op(op, ops.RECURRENT_MAX_TOKENS)["fla"]


@pytest.mark.parametrize("T", [1, 5, 37])
def test_gla_matches_our_op(fla_kernels, T):
    q, k, v, _, _, h0 = _inputs(2, T, 3, 16, 8)
    g = -torch.rand(2, T, 3, 16, generator=torch.Generator().manual_seed(1))
    want_o, want_h = ops.gla(q, k, v, g, scale=0.3, initial_state=h0, output_final_state=True, backend="torch")
    got_o, got_h = _adapter("gla")(q, k, v, g, scale=0.3, initial_state=h0, output_final_state=True)
    torch.testing.assert_close(got_o, want_o, atol=ATOL, rtol=1e-4)
    torch.testing.assert_close(got_h, want_h, atol=ATOL, rtol=1e-4)
    assert got_h.dtype == torch.float32
    expected_kernel = "fused_recurrent_gla" if T <= ops.RECURRENT_MAX_TOKENS else "chunk_gla"
    assert fla_kernels == [("gla", expected_kernel)]


@pytest.mark.parametrize("T, HV, l2norm", [(1, 4, True), (29, 4, True), (29, 8, False)])
def test_gated_delta_rule_matches_our_op(fla_kernels, T, HV, l2norm):
    q, k, v, g, beta, h0 = _inputs(2, T, 4, 16, 8, HV=HV)
    if not l2norm:
        q, k = _fla_l2norm(q), _fla_l2norm(k)  # the delta rule needs unit keys to stay stable
    kwargs = dict(initial_state=h0, output_final_state=True, use_qk_l2norm=l2norm)
    want_o, want_h = ops.gated_delta_rule(q, k, v, g, beta, backend="torch", **kwargs)
    got_o, got_h = _adapter("gated_delta_rule")(q, k, v, g, beta, **kwargs)
    torch.testing.assert_close(got_o, want_o, atol=ATOL, rtol=1e-4)
    torch.testing.assert_close(got_h, want_h, atol=ATOL, rtol=1e-4)
    recurrent = T <= ops.RECURRENT_MAX_TOKENS
    assert fla_kernels == [("gated_delta_rule",
                            "fused_recurrent_gated_delta_rule" if recurrent else "chunk_gated_delta_rule")]


@pytest.mark.parametrize("T", [1, 33])
def test_kda_matches_our_op(fla_kernels, T):
    q, k, v, g, beta, h0 = _inputs(1, T, 2, 16, 16, per_channel=True)
    kwargs = dict(scale=0.2, initial_state=h0, output_final_state=True, use_qk_l2norm=True)
    want_o, want_h = kda(q, k, v, g, beta, backend="torch", **kwargs)
    got_o, got_h = _adapter("kda")(q, k, v, g, beta, **kwargs)
    torch.testing.assert_close(got_o, want_o, atol=ATOL, rtol=1e-4)
    torch.testing.assert_close(got_h, want_h, atol=ATOL, rtol=1e-4)


@pytest.mark.parametrize("T, packed", [(1, False), (37, False), (30, True)])
def test_lightning_matches_our_op(fla_kernels, T, packed):
    from hf_arch.kernels.lightning import lightning_log_decay

    q, k, v, _, _, h0 = _inputs(1, T, 4, 16, 8)
    cu = torch.tensor([0, 11, 30]) if packed else None
    if packed:
        h0 = torch.randn(2, 4, 16, 8, generator=torch.Generator().manual_seed(3)) * 0.1
    kwargs = dict(scale=0.3, initial_state=h0, output_final_state=True, cu_seqlens=cu)
    decay = lightning_log_decay(4, 1, 3)
    if T == 37:  # per token (as the layer passes it with padding): 0 on a few tokens
        decay = decay.expand(1, T, 4) * (torch.arange(T) % 5 != 0)[None, :, None]
    want = ops.lightning_attention(q, k, v, decay, backend="torch", **kwargs)
    got = _adapter("lightning")(q, k, v, decay, **kwargs)
    for got_t, want_t in zip(got, want):
        torch.testing.assert_close(got_t, want_t, atol=ATOL, rtol=1e-4)
    recurrent = T <= ops.RECURRENT_MAX_TOKENS
    assert fla_kernels == [("lightning", "fused_recurrent_simple_gla" if recurrent else "chunk_simple_gla")]


@pytest.mark.parametrize("op", ["gla", "gated_delta_rule", "kda"])
def test_packed_sequences_keep_their_own_states(fla_kernels, op):
    per_channel = op != "gated_delta_rule"
    q, k, v, g, beta, _ = _inputs(1, 30, 2, 16, 8, per_channel=per_channel)
    cu_seqlens = torch.tensor([0, 7, 19, 30])
    h0 = torch.randn(3, 2, 16, 8, generator=torch.Generator().manual_seed(3)) * 0.1
    kwargs = dict(initial_state=h0, output_final_state=True, cu_seqlens=cu_seqlens)
    if op == "gla":
        want = ops.gla(q, k, v, g, backend="torch", **kwargs)
        got = _adapter(op)(q, k, v, g, **kwargs)
    else:
        kwargs["use_qk_l2norm"] = True
        ours = ops.gated_delta_rule if op == "gated_delta_rule" else kda
        want = ours(q, k, v, g, beta, backend="torch", **kwargs)
        got = _adapter(op)(q, k, v, g, beta, **kwargs)
    for got_t, want_t in zip(got, want):
        torch.testing.assert_close(got_t, want_t, atol=ATOL, rtol=1e-4)
    assert got[1].shape == (3, 2, 16, 8)


def test_wrong_keyword_is_caught_by_the_signature_check(fla_kernels):
    """The stand-in is strict: a keyword fla does not take fails, so the tests above can catch a renamed argument."""
    stand_in = fla_backend.load_fla_kernel("gated_delta_rule", recurrent=True)
    q, k, v, g, beta, _ = _inputs(1, 2, 1, 16, 8)
    with pytest.raises(TypeError, match="use_qk_l2norm"):
        stand_in(q=q, k=k, v=v, g=g, beta=beta, use_qk_l2norm=True)


@pytest.mark.parametrize("config_name", ["GatedDeltaNetConfig", "GLAConfig"])
def test_model_forward_on_the_fla_backend(fla_kernels, monkeypatch, config_name):
    """The layers' call sites reach the adapters with what fla needs: same logits as the PyTorch backend."""
    from transformers import AutoModelForCausalLM

    import hf_arch

    if "fla" not in ops._GDR_IMPLS:
        pytest.skip("fla is installed but older than the version the mapping was checked against")
    config = getattr(hf_arch, config_name)(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=2, num_key_value_heads=2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    ids = torch.randint(0, 64, (2, 21), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(ids).logits
        monkeypatch.setenv(dispatch.ENV_VAR, "fla")
        got = model(ids).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    op = "gla" if config_name == "GLAConfig" else "gated_delta_rule"
    assert len(fla_kernels) == 2 and {call[0] for call in fla_kernels} == {op}


def test_cuda_prefers_fla_then_triton():
    cuda = types.SimpleNamespace(is_cuda=True, device=torch.device("cpu"))
    impls = {"torch": lambda: "torch", "triton": lambda: "triton", "fla": lambda: "fla"}
    assert dispatch._device_default(impls, cuda) == "fla"
    assert dispatch._device_default({k: impls[k] for k in ("torch", "triton")}, cuda) == "triton"
    assert dispatch._device_default(impls, torch.zeros(1)) == "torch"


def test_old_fla_is_not_used(monkeypatch, caplog):
    fla_backend._warn_once.cache_clear()
    monkeypatch.setattr(fla_backend, "fla_version", lambda: (0, 4, 1))
    with caplog.at_level(logging.WARNING, logger="hf_arch.kernels"):
        assert fla_backend.fla_op("gla", 8) == {}
    assert "fla 0.4.1 is older than the 0.6.0" in caplog.text
    monkeypatch.setattr(fla_backend, "fla_version", lambda: None)
    assert fla_backend.fla_op("kda", 8) == {}


@pytest.mark.parametrize("text, version", [("0.6.0", (0, 6, 0)), ("0.7.1rc2", (0, 7, 1)), ("1.0", (1, 0))])
def test_version_parsing(text, version):
    assert fla_backend._parse_version(text) == version
