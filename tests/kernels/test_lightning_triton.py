"""Lightning attention on the Triton GLA kernels (through the interpreter on CPU): outputs, final states and the
gradients of q, k, v and the initial state equal the PyTorch reference, with per-head and per-token decays and packed
sequences; ops.lightning_attention reaches it by backend name."""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

from hf_arch.kernels import ops  # noqa: E402
from hf_arch.kernels.lightning.chunk import chunk_lightning_attention  # noqa: E402
from hf_arch.kernels.lightning.triton_lightning import triton_lightning_attention  # noqa: E402


def _inputs(B=2, T=21, H=2, K=16, V=16, per_token=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(B, T, H, K, generator=g), torch.randn(B, T, H, K, generator=g)
    v = torch.randn(B, T, H, V, generator=g)
    h0 = torch.randn(B, H, K, V, generator=g)
    decay = -torch.linspace(0.05, 0.6, H)
    if per_token:  # padding: no decay on the padded tokens
        decay = decay.expand(B, T, H).clone()
        decay[0, :3] = 0.0
    return q, k, v, decay, h0


@pytest.mark.parametrize("per_token", [False, True])
def test_equals_the_pytorch_path_with_gradients(per_token):
    q, k, v, decay, h0 = _inputs(per_token=per_token)
    results = []
    for fn in (chunk_lightning_attention, triton_lightning_attention):
        leaves = [t.clone().requires_grad_() for t in (q, k, v, h0)]
        o, state = fn(*leaves[:3], decay, initial_state=leaves[3], output_final_state=True)
        w = torch.randn(o.shape, generator=torch.Generator().manual_seed(1))
        ws = torch.randn(state.shape, generator=torch.Generator().manual_seed(2))
        ((o * w).sum() + (state * ws).sum()).backward()
        results.append((o, state, *[t.grad for t in leaves]))
    for name, ref, got in zip(("o", "state", "dq", "dk", "dv", "dh0"), *results):
        torch.testing.assert_close(got, ref, rtol=2e-4, atol=2e-4, msg=name)


def test_packed_sequences_and_the_op_backend():
    q, k, v, decay, _ = _inputs(B=1, T=20)
    cu = torch.tensor([0, 7, 20])
    ref, ref_state = chunk_lightning_attention(q, k, v, decay, cu_seqlens=cu, output_final_state=True)
    got, state = ops.lightning_attention(q, k, v, decay, cu_seqlens=cu, output_final_state=True, backend="triton")
    torch.testing.assert_close(got, ref, rtol=2e-4, atol=2e-4)
    torch.testing.assert_close(state, ref_state, rtol=2e-4, atol=2e-4)
