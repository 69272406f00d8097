"""Triton block-sparse attention (forward + backward kernels) against the naive spec, computed in float64.

Runs through the Triton interpreter on CPU (tests/conftest.py sets TRITON_INTERPRET=1 and NaN-poisoned buffers):
tiny shapes only. Every comparison covers the output and the gradients of q, k and v. Most tests shrink the kernel
tiles to 16 so that a block of 32 spans two query / key tiles.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

triton = pytest.importorskip("triton")

from hf_arch.kernels import ops  # noqa: E402
from hf_arch.kernels.block_sparse import (  # noqa: E402
    chunk_block_sparse_attention,
    naive_block_sparse_attention,
)
from hf_arch.kernels.block_sparse import triton_block_sparse as tbs  # noqa: E402
from hf_arch.kernels.block_sparse.triton_block_sparse import (  # noqa: E402
    block_lists,
    triton_block_sparse_attention,
)

NAMES = ("o", "dq", "dk", "dv")
TOL = {torch.float32: 1e-5, torch.float16: 3e-3}


@pytest.fixture
def small_blocks(monkeypatch):
    monkeypatch.setattr(tbs, "BLOCK_M", 16)
    monkeypatch.setattr(tbs, "BLOCK_N", 16)


def rel_rms(got: torch.Tensor, ref: torch.Tensor, floor: float = 1e-2) -> float:
    """RMS(got - ref) / max(RMS(ref), floor) in float64."""
    assert not torch.isnan(got).any(), "NaN in result (an element the kernel never wrote?)"
    got, ref = got.double(), ref.double()
    return ((got - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt().clamp_min(floor)).item()


def make_inputs(B=2, T=37, H=4, H_kv=2, D=16, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, D, generator=g).to(dtype)
    k = torch.randn(B, T, H_kv, D, generator=g).to(dtype)
    v = torch.randn(B, T, H_kv, D, generator=g).to(dtype)
    return q, k, v


def make_mask(B, H, T, block_size, kind="random", seed=1):
    """``random``: causal blocks kept with probability 1/2, diagonal always kept; ``diag``; ``all``."""
    n = -(-T // block_size)
    if kind == "all":
        return torch.ones(B, H, n, n, dtype=torch.bool)
    eye = torch.eye(n, dtype=torch.bool).expand(B, H, n, n)
    if kind == "diag":
        return eye.clone()
    return (torch.rand(B, H, n, n, generator=torch.Generator().manual_seed(seed)) < 0.5) | eye


def run_with_grads(fn, q, k, v, *args, **kwargs):
    leaves = [x.detach().clone().requires_grad_(True) for x in (q, k, v)]
    out = fn(*leaves, *args, **kwargs)
    do = torch.randn(out.shape, generator=torch.Generator().manual_seed(123)).to(out.dtype)
    (out.double() * do.double()).sum().backward()
    return [out] + [x.grad for x in leaves]


def compare(q, k, v, block_mask, block_size, tol=None, **kwargs) -> dict[str, float]:
    """Triton vs the naive spec run in float64 on the same (possibly fp16-rounded) inputs; returns the errors."""
    tol = TOL[q.dtype] if tol is None else tol
    got = run_with_grads(triton_block_sparse_attention, q, k, v, block_mask, block_size, **kwargs)
    ref = run_with_grads(naive_block_sparse_attention, q.double(), k.double(), v.double(), block_mask, block_size,
                         **kwargs)
    errors = {}
    for name, a, b, like in zip(NAMES, got, ref, (q, q, k, v)):
        assert a.shape == b.shape and a.dtype == like.dtype, name
        assert torch.isfinite(a).all(), name
        errors[name] = rel_rms(a, b)
        assert errors[name] < tol, (name, errors)
    return errors


@pytest.mark.parametrize(
    "T,block_size,kind",
    [
        (37, 16, "random"),  # last block partial (5 of 16), GQA 4/2
        (37, 16, "diag"),
        (70, 32, "random"),  # two 16-row tiles per block, last block partial (6 of 32)
        (40, 24, "random"),  # block not a power of two: tiles straddle block edges and are masked
        (9, 16, "all"),  # one partial block
    ],
)
def test_matches_naive_fp32(small_blocks, T, block_size, kind):
    q, k, v = make_inputs(T=T)
    compare(q, k, v, make_mask(2, 4, T, block_size, kind), block_size)


def test_matches_naive_fp16(small_blocks):
    q, k, v = make_inputs(T=37, dtype=torch.float16)
    compare(q, k, v, make_mask(2, 4, 37, 16), 16)


def test_default_tiles_mqa_mha_and_custom_scale():
    # Default tile sizes (one 32-row tile per block), D padded 20 -> 32, MHA and MQA, a custom scale.
    for H_kv in (4, 1):
        q, k, v = make_inputs(B=1, T=45, H_kv=H_kv, D=20)
        compare(q, k, v, make_mask(1, 4, 45, 32), 32, scale=0.3)


def test_all_true_mask_is_dense_causal_attention(small_blocks):
    q, k, v = make_inputs(T=40)
    expected = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.repeat_interleave(2, dim=2).transpose(1, 2),
        v.repeat_interleave(2, dim=2).transpose(1, 2),
        is_causal=True,
    ).transpose(1, 2)
    out = triton_block_sparse_attention(q, k, v, make_mask(2, 4, 40, 16, "all"), 16)
    assert rel_rms(out, expected) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_attention_mask_padding_and_empty_rows(small_blocks, dtype):
    q, k, v = make_inputs(T=40, dtype=dtype)
    mask = make_mask(2, 4, 40, 16)
    mask[1, 2, 1, :] = False  # (b=1, h=2): query block 1 selects nothing -> zero rows
    pad = torch.ones(2, 40, dtype=torch.long)
    pad[0, :20] = 0  # the whole first block and part of the second are padding
    pad[1, -7:] = 0
    compare(q, k, v, mask, 16, attention_mask=pad)
    o, dq, dk, dv = run_with_grads(triton_block_sparse_attention, q, k, v, mask, 16, attention_mask=pad)
    assert (o[0, :20] == 0).all() and (o[1, 16:32, 2] == 0).all()
    assert (dq[0, :20] == 0).all() and (dq[1, 16:32, 2] == 0).all()
    for g in (dk, dv):  # padding keys take no gradient
        assert torch.isfinite(g).all() and (g[0, :20] == 0).all() and (g[1, -7:] == 0).all()


def test_block_lists_forward_and_reverse():
    mask = torch.tensor([[1, 1, 0], [0, 1, 1], [1, 0, 1]], dtype=torch.bool)[None, None]  # (1, 2) is non-causal
    idx, cnt, ridx, rcnt = block_lists(mask)
    assert cnt.tolist() == [[[1, 1, 2]]] and rcnt.tolist() == [[[2, 1, 1]]]
    assert idx[0, 0, 2, :2].tolist() == [0, 2] and idx[0, 0, 1, :1].tolist() == [1]
    assert ridx[0, 0, 0, :2].tolist() == [0, 2] and ridx[0, 0, 1, :1].tolist() == [1]
    assert idx.dtype == ridx.dtype == cnt.dtype == torch.int32


def test_ops_backends_agree_and_env_override(monkeypatch, small_blocks):
    q, k, v = make_inputs(B=1, T=35)
    mask = make_mask(1, 4, 35, 16)
    torch_out = run_with_grads(ops.block_sparse_attention, q, k, v, mask, 16, backend="torch")
    monkeypatch.setenv("HF_ARCH_KERNEL_BACKEND", "triton")
    triton_out = run_with_grads(ops.block_sparse_attention, q, k, v, mask, 16)
    for a, b in zip(torch_out, triton_out):
        assert rel_rms(b, a) < 1e-5
    chunk = chunk_block_sparse_attention(q, k, v, mask, 16)
    assert rel_rms(triton_out[0], chunk) < 1e-5


def test_bad_inputs_raise():
    q, k, v = make_inputs(B=1, T=20)
    mask = make_mask(1, 4, 20, 16)
    fn = triton_block_sparse_attention
    with pytest.raises(ValueError, match="q must be 4-D"):
        fn(q[0], k, v, mask, 16)
    with pytest.raises(ValueError, match="dtype"):
        fn(q, k.half(), v.half(), mask, 16)
    with pytest.raises(ValueError, match="block_mask must have shape"):
        fn(q, k, v, mask, 8)
    with pytest.raises(ValueError, match="block_mask must have dtype torch.bool"):
        fn(q, k, v, mask.int(), 16)
    with pytest.raises(ValueError, match="block_size"):
        fn(q, k, v, mask, 0)
    with pytest.raises(ValueError, match="attention_mask"):
        fn(q, k, v, mask, 16, attention_mask=torch.ones(1, 19))
