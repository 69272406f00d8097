"""The weight maps `output_attentions` returns for the score-op variants reproduce the ops' outputs (W @ V)."""

from __future__ import annotations

import torch

from hf_arch.kernels.block_sparse.naive import block_sparse_attention_weights, naive_block_sparse_attention
from hf_arch.kernels.krr.naive import naive_krr_attention, naive_krr_attention_weights
from hf_arch.kernels.sa_softmax.naive import sa_softmax_attention_weights
from hf_arch.kernels.ops import sa_softmax_attention


def _apply(weights, v, group):
    return torch.einsum("bhts,bshd->bthd", weights, v.repeat_interleave(group, dim=2))


def _inputs(T_q=4, S=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, T_q, 4, 8, generator=g, dtype=torch.float64)
    k = torch.randn(2, S, 2, 8, generator=g, dtype=torch.float64)
    v = torch.randn(2, S, 2, 8, generator=g, dtype=torch.float64)
    mask = torch.ones(2, S, dtype=torch.long)
    mask[1, :3] = 0
    return q, k, v, mask


def test_sa_softmax_maps_reproduce_the_op_in_prefill_and_decode():
    for T_q in (9, 3):
        q, k, v, mask = _inputs(T_q)
        for mode in ("plain", "normalized"):
            weights = sa_softmax_attention_weights(q, k, mode=mode, scale=0.3, attention_mask=mask)
            assert weights.shape == (2, 4, T_q, 9)
            out = sa_softmax_attention(q, k, v, mode=mode, scale=0.3, attention_mask=mask, backend="torch")
            torch.testing.assert_close(_apply(weights, v, 2), out, rtol=1e-5, atol=1e-6)  # the op runs in fp32


def test_krr_maps_reproduce_the_op_in_prefill_and_decode():
    for T_q in (9, 3):
        q, k, v, mask = _inputs(T_q)
        weights = naive_krr_attention_weights(q, k, ridge=0.5, temperature=2.0, attention_mask=mask)
        out = naive_krr_attention(q, k, v, ridge=0.5, temperature=2.0, attention_mask=mask)
        torch.testing.assert_close(_apply(weights, v, 2), out)
        assert (weights[1, :, :, :3] == 0).all()  # padded keys get no weight


def test_block_sparse_maps_reproduce_the_op():
    q, k, v, mask = _inputs(T_q=9)
    block_mask = torch.rand(2, 4, 3, 3, generator=torch.Generator().manual_seed(3)) > 0.4
    block_mask |= torch.eye(3, dtype=torch.bool)  # every query block sees its own block
    weights = block_sparse_attention_weights(q, k, block_mask, 3, 0.3, mask)
    out = naive_block_sparse_attention(q, k, v, block_mask, 3, scale=0.3, attention_mask=mask)
    torch.testing.assert_close(_apply(weights, v, 2), out)
