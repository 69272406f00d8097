"""Lightning attention kernels (kernels/lightning): chunked and recurrent paths against the token-by-token
reference (fp64), states carried across calls and packed sequences, gradients, fla's simple_gla reference (the
mapping of the CUDA backend), and bad input named."""

from __future__ import annotations

import pytest
import torch

from hf_arch.kernels.lightning import (
    chunk_lightning_attention, fused_recurrent_lightning_attention, lightning_log_decay, naive_lightning_attention,
)
from hf_arch.kernels.ops import lightning_attention


def _inputs(B=2, T=70, H=4, K=16, V=8, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(B, T, H, K, generator=gen, dtype=dtype) for _ in range(2))
    v = torch.randn(B, T, H, V, generator=gen, dtype=dtype)
    return q, k, v, lightning_log_decay(H, 1, 4).to(dtype), torch.randn(B, H, K, V, generator=gen, dtype=dtype)


def test_log_decay_follows_transnormer():
    decay = lightning_log_decay(4, layer_idx=2, num_layers=8)
    torch.testing.assert_close(decay, -(8 / 4) * (1 - 2 / 8) * torch.arange(4.0))
    assert decay[0] == 0 and (decay <= 0).all()


@pytest.mark.parametrize("fn, kwargs", [(chunk_lightning_attention, dict(chunk_size=16)),
                                        (chunk_lightning_attention, dict(chunk_size=64)),
                                        (fused_recurrent_lightning_attention, {})])
def test_paths_equal_the_reference(fn, kwargs):
    q, k, v, decay, h0 = _inputs()
    expected = naive_lightning_attention(q, k, v, decay, initial_state=h0, output_final_state=True)
    got = fn(q, k, v, decay, initial_state=h0, output_final_state=True, **kwargs)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_state_carries_across_calls_and_packed_sequences_stay_apart():
    q, k, v, decay, _ = _inputs(B=1, T=50)
    whole, state = chunk_lightning_attention(q, k, v, decay, output_final_state=True, chunk_size=16)
    first, mid = chunk_lightning_attention(q[:, :30], k[:, :30], v[:, :30], decay, output_final_state=True,
                                           chunk_size=16)
    rest, end = lightning_attention(q[:, 30:], k[:, 30:], v[:, 30:], decay, initial_state=mid,
                                    output_final_state=True)
    torch.testing.assert_close(torch.cat([first, rest], 1), whole)
    torch.testing.assert_close(end, state)
    cu = torch.tensor([0, 20, 50])
    packed, states = chunk_lightning_attention(q, k, v, decay, output_final_state=True, cu_seqlens=cu, chunk_size=16)
    for i, (s, e) in enumerate(((0, 20), (20, 50))):
        alone, alone_state = naive_lightning_attention(q[:, s:e], k[:, s:e], v[:, s:e], decay, output_final_state=True)
        torch.testing.assert_close(packed[:, s:e], alone)
        torch.testing.assert_close(states[i:i + 1], alone_state)


def test_gradients_equal_the_reference():
    q, k, v, decay, h0 = _inputs(T=40)
    grads = []
    for fn in (naive_lightning_attention, lambda *a, **kw: chunk_lightning_attention(*a, chunk_size=16, **kw)):
        leaves = [t.clone().requires_grad_() for t in (q, k, v, h0)]
        o, s = fn(*leaves[:3], decay, initial_state=leaves[3], output_final_state=True)
        (o.square().sum() + s.sum()).backward()
        grads.append([t.grad for t in leaves])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_matches_fla_simple_gla_reference():
    naive = pytest.importorskip("fla.ops.simple_gla.naive")
    q, k, v, decay, h0 = _inputs(B=1, T=33, dtype=torch.float32)
    g = decay.expand(1, 33, -1).contiguous()
    expected, expected_state = naive.naive_recurrent_simple_gla(q, k, v, g, initial_state=h0, output_final_state=True)
    got, state = chunk_lightning_attention(q, k, v, decay, initial_state=h0, output_final_state=True, chunk_size=16)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(state, expected_state, rtol=1e-4, atol=1e-4)


def test_bad_input_is_named():
    q, k, v, decay, _ = _inputs()
    with pytest.raises(ValueError, match="log_decay must be a tensor \\[H\\] = \\[4\\]"):
        chunk_lightning_attention(q, k, v, decay[:2])
    with pytest.raises(ValueError, match="<= 0"):
        chunk_lightning_attention(q, k, v, -decay)
    with pytest.raises(ValueError, match="initial_state shape"):
        chunk_lightning_attention(q, k, v, decay, initial_state=torch.zeros(1, 4, 16, 8, dtype=q.dtype))
    with pytest.raises(ValueError, match="chunk_size"):
        chunk_lightning_attention(q, k, v, decay, chunk_size=0)
