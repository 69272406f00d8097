"""Block-sparse attention and pooled scores: chunked paths vs the naive spec, naive vs SDPA, padding, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hf_arch.kernels import ops
from hf_arch.kernels.block_sparse import (
    chunk_block_sparse_attention,
    chunk_pooled_attention_scores,
    naive_block_sparse_attention,
    naive_pooled_attention_scores,
)


def _rel_rms(a: torch.Tensor, b: torch.Tensor, floor: float = 1e-30) -> float:
    """RMS(a - b) / RMS(b); ``floor`` bounds the denominator where the reference is (nearly) 0."""
    a, b = a.double(), b.double()
    return ((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt().clamp_min(floor)).item()


def _inputs(B=2, T=19, H=4, H_kv=2, D=8, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, D, generator=g).to(dtype)
    k = torch.randn(B, T, H_kv, D, generator=g).to(dtype)
    v = torch.randn(B, T, H_kv, D, generator=g).to(dtype)
    return q, k, v


def _block_mask(B, H, T, block_size, kind="random", seed=1):
    """``random``: each causal block kept with probability 1/2, diagonal always kept; ``diag``; ``all``."""
    n = -(-T // block_size)
    if kind == "all":
        return torch.ones(B, H, n, n, dtype=torch.bool)
    eye = torch.eye(n, dtype=torch.bool).expand(B, H, n, n)
    if kind == "diag":
        return eye.clone()
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(B, H, n, n, generator=g) < 0.5) | eye


def _run_with_grads(fn, q, k, v, *args, **kwargs):
    leaves = [x.detach().clone().requires_grad_(True) for x in (q, k, v)]
    out = fn(*leaves, *args, **kwargs)
    g = torch.Generator().manual_seed(123)
    (out.float() * torch.randn(out.shape, generator=g)).sum().backward()
    return [out] + [x.grad for x in leaves]


def _compare(q, k, v, block_mask, block_size, tol=1e-5, **kwargs):
    ref = _run_with_grads(naive_block_sparse_attention, q, k, v, block_mask, block_size, **kwargs)
    got = _run_with_grads(chunk_block_sparse_attention, q, k, v, block_mask, block_size, **kwargs)
    for name, a, b, like in zip(("o", "dq", "dk", "dv"), got, ref, (q, q, k, v)):
        assert a.shape == like.shape and a.dtype == like.dtype, name
        assert torch.isfinite(a).all(), name
        assert _rel_rms(a, b, floor=1e-2) < tol, (name, _rel_rms(a, b, floor=1e-2))


@pytest.mark.parametrize(
    "T,block_size,kind",
    [
        (37, 8, "random"),  # last block partial (5 of 8), GQA 4/2
        (37, 8, "diag"),
        (37, 8, "all"),
        (32, 8, "random"),  # T a multiple of the block
        (5, 8, "random"),  # one partial block
        (13, 1, "random"),  # one position per block
        (1, 4, "all"),
    ],
)
@pytest.mark.parametrize("path", ["split_flash", "masked_groups"])
def test_chunk_matches_naive_fp32(T, block_size, kind, path, monkeypatch):
    """Both eager CPU paths: merged flash calls (no key padding) and the masked groups (what padding needs)."""
    from hf_arch.kernels.block_sparse import chunk, split_flash

    calls = []
    real_split = split_flash.split_flash_block_sparse
    monkeypatch.setattr(chunk, "split_flash_block_sparse", lambda *a: calls.append(1) or real_split(*a))
    if path == "masked_groups":
        monkeypatch.setattr(chunk, "_split_flash_applies", lambda q, attention_mask: False)
    q, k, v = _inputs(T=T)
    _compare(q, k, v, _block_mask(2, 4, T, block_size, kind), block_size)
    assert len(calls) == (1 if path == "split_flash" else 0)


def test_split_flash_gradcheck_fp64_and_rows_without_keys():
    """The merged path's backward (torch's flash backward per part, against the merged output and log-sum-exp)."""
    q, k, v = (x.double().requires_grad_(True) for x in _inputs(B=1, T=11, H=2, H_kv=1, D=3))
    mask = _block_mask(1, 2, 11, 3)
    mask[0, 0, 2, 2] = False  # a row with earlier blocks only
    mask[0, 1, 3] = False  # a row with no key at all: zeros

    def fn(q, k, v):
        return chunk_block_sparse_attention(q, k, v, mask, 3)

    assert (fn(q, k, v)[0, 9:, 1] == 0).all()
    assert torch.autograd.gradcheck(fn, (q, k, v))


def test_width_ladder_pads_at_most_one_and_a_half_times():
    from hf_arch.kernels.block_sparse.chunk import width_ladder

    assert width_ladder(1) == [1] and width_ladder(13) == [1, 2, 3, 4, 6, 8, 12, 13]
    for n in (5, 64, 100):
        ladder = width_ladder(n)
        assert ladder[-1] == n
        for count in range(1, n + 1):
            assert next(w for w in ladder if w >= count) <= max(2, 1.5 * count)


def test_rows_without_their_diagonal_block_match_naive():
    """Rows that skip their own block (attending only earlier ones) and rows that keep it, in one call."""
    q, k, v = _inputs(T=40)
    g = torch.Generator().manual_seed(5)
    mask = torch.rand(2, 4, 10, 10, generator=g) < 0.5  # the diagonal kept or not at random
    assert (~mask.diagonal(dim1=-2, dim2=-1)).any() and mask.diagonal(dim1=-2, dim2=-1).any()
    _compare(q, k, v, mask, 4)


def test_diagonal_first_orders_selected_blocks():
    from hf_arch.kernels.block_sparse.chunk import diagonal_first

    selected = torch.tensor([[1, 0, 0], [1, 1, 0], [1, 0, 1]], dtype=torch.bool)
    order, counts = diagonal_first(selected)
    assert counts.tolist() == [1, 2, 2]
    assert order[0, :1].tolist() == [0] and order[1, :2].tolist() == [1, 0] and order[2, :2].tolist() == [2, 0]
    off_diagonal = torch.tensor([[0, 0, 0], [1, 0, 0], [1, 1, 0]], dtype=torch.bool)
    order, counts = diagonal_first(off_diagonal)
    assert order[2, :2].tolist() == [0, 1] and counts.tolist() == [0, 1, 2]


def test_traced_graph_path_matches_naive(monkeypatch):
    """Under torch.compile the op cannot size groups by the counts: one group of every causal block."""
    q, k, v = _inputs(T=29)
    mask = _block_mask(2, 4, 29, 4)
    mask[0, 0, 3, 3] = False  # one row without its diagonal block: the second traced group
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    _compare(q, k, v, mask, 4)


def test_chunk_matches_naive_fp16_and_custom_scale():
    q, k, v = _inputs(T=21, dtype=torch.float16)
    _compare(q, k, v, _block_mask(2, 4, 21, 4), 4, tol=2e-3)
    q, k, v = _inputs(T=21)
    _compare(q, k, v, _block_mask(2, 4, 21, 4), 4, scale=0.3)


@pytest.mark.parametrize("H_kv", [1, 4])
def test_chunk_matches_naive_mqa_and_mha(H_kv):
    q, k, v = _inputs(T=17, H_kv=H_kv)
    _compare(q, k, v, _block_mask(2, 4, 17, 4), 4)


def test_all_true_mask_is_dense_causal_attention():
    q, k, v = _inputs(T=23)
    expected = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.repeat_interleave(2, dim=2).transpose(1, 2),
        v.repeat_interleave(2, dim=2).transpose(1, 2),
        is_causal=True,
    ).transpose(1, 2)
    mask = _block_mask(2, 4, 23, 5, "all")
    for fn in (naive_block_sparse_attention, chunk_block_sparse_attention):
        assert _rel_rms(fn(q, k, v, mask, 5), expected) < 1e-5
    # Entries above the diagonal are ignored: a full mask and its lower triangle give the same result.
    assert _rel_rms(chunk_block_sparse_attention(q, k, v, mask.tril(), 5), expected) < 1e-5


def test_mask_selects_exactly_the_chosen_blocks():
    # Query block 2 sees only key block 0 (and not its own diagonal): its output is causal attention over block 0.
    q, k, v = _inputs(B=1, T=12, H=2, H_kv=2)
    mask = torch.zeros(1, 2, 3, 3, dtype=torch.bool)
    mask[:, :, 0, 0] = mask[:, :, 1, 1] = mask[:, :, 2, 0] = True
    out = chunk_block_sparse_attention(q, k, v, mask, 4)
    probs = (torch.einsum("bthd,bshd->bhts", q[:, 8:], k[:, :4]) * 8**-0.5).softmax(-1)
    expected = torch.einsum("bhts,bshd->bthd", probs, v[:, :4])
    assert _rel_rms(out[:, 8:], expected) < 1e-5
    _compare(q, k, v, mask, 4)


def test_attention_mask_padding_and_empty_rows_give_zeros_not_nan():
    q, k, v = _inputs(B=3, T=14)
    mask = _block_mask(3, 4, 14, 4)
    pad = torch.ones(3, 14, dtype=torch.long)
    pad[0, :6] = 0  # left padding over a whole block and a half
    pad[1, -5:] = 0  # right padding
    pad[2, :] = 0  # nothing real
    _compare(q, k, v, mask, 4, attention_mask=pad)
    for fn in (naive_block_sparse_attention, chunk_block_sparse_attention):
        o, dq, dk, dv = _run_with_grads(fn, q, k, v, mask, 4, attention_mask=pad)
        assert (o[0, :6] == 0).all() and (o[2] == 0).all()
        assert (dq[0, :6] == 0).all() and (dq[2] == 0).all()
        for g in (dk, dv):  # padding keys take no gradient
            assert torch.isfinite(g).all() and (g[0, :6] == 0).all() and (g[2] == 0).all()
    # With the all-true mask (block edges then do not matter) a left-padded row equals the run of its real tokens.
    full = _block_mask(3, 4, 14, 4, "all")
    out = chunk_block_sparse_attention(q, k, v, full, 4, attention_mask=pad)
    alone = chunk_block_sparse_attention(q[:1, 6:], k[:1, 6:], v[:1, 6:], _block_mask(1, 4, 8, 4, "all"), 4)
    torch.testing.assert_close(out[:1, 6:], alone, rtol=1e-5, atol=1e-6)


def test_row_with_no_selected_block_outputs_zero():
    q, k, v = _inputs(T=12)
    mask = _block_mask(2, 4, 12, 4)
    mask[0, 1, 1, :] = False  # (b=0, h=1) query block 1 selects nothing
    mask[1, :, 2, :] = False  # query block 2 selects nothing for any head
    mask[1, 0, 2, 3:] = True  # ...except a non-causal block, which must be ignored
    _compare(q, k, v, mask, 4)
    for fn in (naive_block_sparse_attention, chunk_block_sparse_attention):
        o, dq, _, _ = _run_with_grads(fn, q, k, v, mask, 4)
        assert torch.isfinite(o).all()
        assert (o[0, 4:8, 1] == 0).all() and (o[1, 8:12] == 0).all()
        assert (dq[0, 4:8, 1] == 0).all() and (dq[1, 8:12] == 0).all()
    # A mask selecting nothing at all: zero output, zero (not missing) gradients.
    o, dq, dk, dv = _run_with_grads(chunk_block_sparse_attention, q, k, v, torch.zeros_like(mask), 4)
    assert all((x == 0).all() for x in (o, dq, dk, dv))


def test_chunk_gradcheck_fp64():
    q, k, v = (x.double().requires_grad_(True) for x in _inputs(B=1, T=7, H=2, H_kv=1, D=3))
    mask = _block_mask(1, 2, 7, 3)
    pad = torch.tensor([[0, 1, 1, 1, 1, 1, 1]])

    def fn(q, k, v):
        return chunk_block_sparse_attention(q, k, v, mask, 3, attention_mask=pad)

    assert torch.autograd.gradcheck(fn, (q, k, v))


def _brute_force_pooled(q, k, block_size, pool, attention_mask=None):
    """Plain loops: per-row causal softmax over real keys, then per-tile pooling, causal cut, row renormalisation."""
    B, T, H, D = q.shape
    group = H // k.shape[2]
    n = -(-T // block_size)
    real = [[True] * T for _ in range(B)] if attention_mask is None else attention_mask.bool().tolist()
    out = torch.zeros(B, H, n, n, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            P = torch.zeros(T, T, dtype=torch.float64)
            for t in range(T):
                keys = [s for s in range(t + 1) if real[b][s]]
                if keys:
                    logits = torch.stack([q[b, t, h].double() @ k[b, s, h // group].double() for s in keys]) * D**-0.5
                    P[t, keys] = logits.softmax(0)
            for i in range(n):
                rows = [t for t in range(i * block_size, min((i + 1) * block_size, T)) if real[b][t]]
                for j in range(i + 1):
                    cols = list(range(j * block_size, min((j + 1) * block_size, T)))
                    if not rows:
                        continue
                    tile = P[rows][:, cols]
                    out[b, h, i, j] = tile.max() if pool == "max" else tile.sum(1).mean()
                total = out[b, h, i].sum()
                if total > 0:
                    out[b, h, i] /= total
    return out


@pytest.mark.parametrize("pool", ["max", "mean"])
def test_pooled_scores_match_brute_force_and_naive(pool):
    q, k, _ = _inputs(B=2, T=7, H=2, H_kv=1, D=4)
    pad = torch.tensor([[1] * 7, [0, 0, 0, 0, 1, 1, 1]])  # row 1: query block 0 entirely padding
    for mask in (None, pad):
        expected = _brute_force_pooled(q, k, 3, pool, mask)
        naive = naive_pooled_attention_scores(q, k, 3, attention_mask=mask, pool=pool)
        chunk = chunk_pooled_attention_scores(q, k, 3, attention_mask=mask, pool=pool)
        assert naive.dtype == chunk.dtype == torch.float32 and naive.shape == (2, 2, 3, 3)
        torch.testing.assert_close(naive.double(), expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(chunk.double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("pool", ["max", "mean"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_pooled_scores_chunk_matches_naive_rows_sum_to_one(pool, dtype):
    q, k, _ = _inputs(B=2, T=37, H=4, H_kv=2, D=8, dtype=dtype)
    pad = torch.ones(2, 37, dtype=torch.long)
    pad[0, :9] = 0  # query blocks 0 and 1 (block 8) of row 0: block 0 all padding
    pad[1, -3:] = 0
    naive = naive_pooled_attention_scores(q, k, 8, attention_mask=pad, pool=pool, scale=0.4)
    chunk = chunk_pooled_attention_scores(q, k, 8, attention_mask=pad, pool=pool, scale=0.4)
    torch.testing.assert_close(chunk, naive, rtol=1e-5, atol=1e-6)
    sums = chunk.sum(-1)
    torch.testing.assert_close(sums[0, :, 1:], torch.ones(4, 4))
    torch.testing.assert_close(sums[1], torch.ones(4, 5))
    assert (chunk[0, :, 0] == 0).all()  # an all-padding query block has nothing to pool
    assert (chunk.triu(1) == 0).all()  # non-causal tiles are 0


def test_pooled_scores_through_ops_and_grad_free():
    q, k, _ = _inputs(T=11)
    q.requires_grad_(True)
    got = ops.pooled_attention_scores(q, k, 4, pool="mean")
    assert not got.requires_grad
    torch.testing.assert_close(got, naive_pooled_attention_scores(q, k, 4, pool="mean"))


def test_ops_torch_backend_matches_naive():
    q, k, v = _inputs(T=19)
    mask = _block_mask(2, 4, 19, 4)
    out = ops.block_sparse_attention(q, k, v, mask, 4, backend="torch", attention_mask=torch.ones(2, 19))
    assert _rel_rms(out, naive_block_sparse_attention(q, k, v, mask, 4)) < 1e-5
    with pytest.raises(ValueError, match="backend 'cuda_graph' is not available"):
        ops.block_sparse_attention(q, k, v, mask, 4, backend="cuda_graph")


def test_bad_inputs_raise():
    q, k, v = _inputs(B=1, T=6)
    mask = _block_mask(1, 4, 6, 4)  # N = 2
    for fn in (naive_block_sparse_attention, chunk_block_sparse_attention):
        with pytest.raises(ValueError, match="q must be 4-D"):
            fn(q[0], k, v, mask, 4)
        with pytest.raises(ValueError, match="k and v"):
            fn(q, k, v[..., :4], mask, 4)
        with pytest.raises(ValueError, match="k/v must be"):
            fn(q, k[:, :5], v[:, :5], mask, 4)
        with pytest.raises(ValueError, match="dtype"):
            fn(q, k.double(), v.double(), mask, 4)
        with pytest.raises(ValueError, match="divisible"):
            fn(q, torch.randn(1, 6, 3, 8), torch.randn(1, 6, 3, 8), mask, 4)
        with pytest.raises(ValueError, match="block_size must be an int >= 1"):
            fn(q, k, v, mask, 0)
        with pytest.raises(ValueError, match=r"block_mask must have shape \[B, H, Nq, Nk\] = \(1, 4, 2, 2\)"):
            fn(q, k, v, _block_mask(1, 4, 6, 2), 4)  # built for block size 2: N = 3
        with pytest.raises(ValueError, match=r"block_mask must have shape .* got \(1, 2, 2, 2\)"):
            fn(q, k, v, mask[:, :2], 4)
        with pytest.raises(ValueError, match="block_mask must have dtype torch.bool"):
            fn(q, k, v, mask.float(), 4)
        with pytest.raises(ValueError, match="block_mask must be a bool torch.Tensor"):
            fn(q, k, v, mask.tolist(), 4)
        with pytest.raises(ValueError, match="attention_mask must have shape"):
            fn(q, k, v, mask, 4, attention_mask=torch.ones(1, 5))
    for fn in (naive_pooled_attention_scores, chunk_pooled_attention_scores):
        with pytest.raises(ValueError, match="pool must be one of"):
            fn(q, k, 4, pool="sum")
        with pytest.raises(ValueError, match="k must be 4-D"):
            fn(q, k[0], 4)
        with pytest.raises(ValueError, match="block_size"):
            fn(q, k, True)


@pytest.mark.slow
def test_compiles_to_one_graph():
    q, k, v = _inputs(B=1, T=40, H=2, H_kv=2)
    mask = torch.rand(1, 2, 10, 10, generator=torch.Generator().manual_seed(2)) < 0.5
    compiled = torch.compile(chunk_block_sparse_attention, fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v, mask, 4), naive_block_sparse_attention(q, k, v, mask, 4),
                               rtol=1e-5, atol=1e-5)
