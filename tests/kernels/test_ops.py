"""The public ops give the same results whichever backend runs them (Triton through its interpreter here)."""

from __future__ import annotations

import pytest
import torch

from hf_arch.kernels import ops

pytest.importorskip("triton")


def _rel_rms(a, b):
    return ((a.double() - b.double()).pow(2).mean().sqrt() / b.double().pow(2).mean().sqrt().clamp_min(1e-30)).item()




def _grads(fn, inputs):
    inputs = [x.detach().clone().requires_grad_(x.is_floating_point()) for x in inputs]
    out = fn(*inputs)
    o, state = out if isinstance(out, tuple) else (out, None)
    loss = o.pow(2).sum() + (state.sum() if state is not None else 0)
    loss.backward()
    return [o, *(x.grad for x in inputs if x.requires_grad)]


@pytest.mark.parametrize("T", [5, 30])  # recurrent (T <= 8) and chunked torch paths
def test_gla_backends_agree(T):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, T, 2, 16) for _ in range(3))
    g = torch.nn.functional.logsigmoid(torch.randn(2, T, 2, 16)) / 4
    h0 = torch.randn(2, 2, 16, 16)
    results = [_grads(lambda *x: ops.gla(*x[:4], initial_state=x[4], output_final_state=True, backend=b),
                      [q, k, v, g, h0]) for b in ("torch", "triton")]
    for a, b in zip(*results):
        assert _rel_rms(b, a) < 1e-5


def test_gated_delta_rule_backends_agree():
    torch.manual_seed(0)
    T = 21
    q, k, v = (torch.randn(1, T, 2, 16) for _ in range(3))
    g = -torch.rand(1, T, 2)
    beta = torch.rand(1, T, 2)
    results = [_grads(lambda *x: ops.gated_delta_rule(*x, output_final_state=True, use_qk_l2norm=True, backend=b),
                      [q, k, v, g, beta]) for b in ("torch", "triton")]
    for a, b in zip(*results):
        assert _rel_rms(b, a) < 1e-5


def test_sliding_window_backends_agree_and_env_override(monkeypatch):
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 19, 4, 16), torch.randn(1, 19, 2, 16), torch.randn(1, 19, 2, 16)
    sinks = torch.randn(4, 2)
    torch_out = _grads(lambda *x: ops.sliding_window_attention(*x[:3], 5, sink_logits=x[3], backend="torch"),
                       [q, k, v, sinks])
    monkeypatch.setenv("HF_ARCH_KERNEL_BACKEND", "triton")
    triton_out = _grads(lambda *x: ops.sliding_window_attention(*x[:3], 5, sink_logits=x[3]), [q, k, v, sinks])
    for a, b in zip(torch_out, triton_out):
        assert _rel_rms(b, a) < 1e-5
    with pytest.raises(ValueError, match="backend 'cuda_graph' is not available"):
        ops.sliding_window_attention(q, k, v, 5, backend="cuda_graph")
