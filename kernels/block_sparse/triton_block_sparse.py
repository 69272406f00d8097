"""Block-sparse causal softmax attention in Triton: forward and backward kernels.

Same contract as :func:`naive_block_sparse_attention`: q ``[B, T, H, D]``, k/v ``[B, T, H_kv, D]`` (q head ``h``
uses kv head ``h // (H // H_kv)``), block_mask bool ``[B, H, N, N]`` with ``N = ceil(T / block_size)``; query block
``i`` attends key block ``j`` where ``block_mask[b, h, i, j]`` and ``j <= i``, causally inside, never a padding key
(``attention_mask == 0``). Softmax in fp32, output in q's dtype, a row with no attendable key gives 0.

Design (flash-attention-2 style, written for this package)
-----------------------------------------------------------
* Host side: the block mask, cut to its causal part, becomes per-(b, h, i) lists of selected key blocks (ascending)
  plus counts; its transpose gives the reverse lists "which query blocks selected key block j" for the backward.
* Tiles: a block of ``block_size`` positions is covered by tiles of ``BLOCK_M`` query rows / ``BLOCK_N`` key rows
  (powers of two >= 16, at most ``block_size`` rounded up); rows of a tile past the block or past T are masked, so
  any ``block_size`` works.
* Forward: one program per (query tile, batch * q head). It visits only the selected key blocks, keeping an fp32
  online softmax (running max ``m``, denominator ``l``, accumulator), and stores the output and the row
  log-sum-exp ``lse = m + log l`` (an empty row stores 0 and ``lse = 0``). Masked scores are ``-inf``; while a
  row's max is still ``-inf`` it is replaced by 0, so no ``inf - inf`` appears.
* Backward: ``delta_t = sum_d dO_td O_td`` (torch); probabilities are recomputed as ``exp(s - lse)``.
  ``dq`` kernel: per query tile, the same key blocks as the forward: ``dS = P * (dO V^T - delta)``,
  ``dq = scale dS K``. ``dk/dv`` kernel: per (key tile, batch * kv head), loop over the ``H // H_kv`` q heads of the
  group and, through the reverse lists, over the query blocks that selected this key block:
  ``dv += P^T dO``, ``dk += scale dS^T Q``.
  The reverse lists (rather than fp32 atomic adds into scratch buffers) keep dk/dv deterministic, accumulate the
  GQA group in registers, and need no zero-filled fp32 copies of dk/dv nor a cast pass; they cost one extra sort
  of the ``[B, H, N, N]`` mask on the host.
* ``D`` is padded to a power of two >= 16 (``BLOCK_D``) and masked; every load and store is masked. fp32 inputs use
  IEEE fp32 dots (no tf32); fp16/bf16 inputs use 16-bit dots with fp32 accumulation (P and dS rounded to the input
  dtype for the second matmul, as in flash-attention).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..buffers import new_buffer
from .chunk import selected_blocks
from .naive import num_blocks, validate_block_sparse_inputs

__all__ = ["triton_block_sparse_attention"]

# Largest query / key tile; the wrapper shrinks them to the block size. Powers of two >= 16 (tests set them to 16
# to exercise several tiles per block on tiny inputs).
BLOCK_M = 64
BLOCK_N = 64


@triton.jit
def _bsa_fwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, idx_ptr, cnt_ptr, kmask_ptr,
    T, NB, BS, scale,
    H: tl.constexpr, H_KV: tl.constexpr, D: tl.constexpr, SUBS_M: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_MASK: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    h_kv = h // (H // H_KV)
    i = pid_m // SUBS_M  # query block
    local_m = (pid_m % SUBS_M) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_m = i * BS + local_m
    m_row = (local_m < BS) & (offs_m < T)
    offs_d = tl.arange(0, BLOCK_D)
    m_d = offs_d < D
    q_rows = (b * T + offs_m) * H + h  # row index into [B * T * H]
    row_mask = m_row[:, None] & m_d[None, :]
    q = tl.load(q_ptr + q_rows[:, None] * D + offs_d[None, :], mask=row_mask, other=0.0)

    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) + float("-inf")
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    list_at = pid_bh.to(tl.int64) * NB + i  # (b, h, i) in the [B, H, N] counts / [B, H, N, N] lists
    count = tl.load(cnt_ptr + list_at)
    for t in range(0, count):
        j = tl.load(idx_ptr + list_at * NB + t)  # selected key block, j <= i
        for n_sub in range(0, BS, BLOCK_N):
            local_n = n_sub + tl.arange(0, BLOCK_N)
            offs_n = j * BS + local_n
            m_col = (local_n < BS) & (offs_n < T)
            kv_rows = (b * T + offs_n) * H_KV + h_kv
            kv_mask = m_col[:, None] & m_d[None, :]
            k = tl.load(k_ptr + kv_rows[:, None] * D + offs_d[None, :], mask=kv_mask, other=0.0)
            v = tl.load(v_ptr + kv_rows[:, None] * D + offs_d[None, :], mask=kv_mask, other=0.0)

            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # [BLOCK_M, BLOCK_N] fp32
            valid = (offs_n[None, :] <= offs_m[:, None]) & m_col[None, :]
            if HAS_MASK:
                key_ok = tl.load(kmask_ptr + b * T + offs_n, mask=m_col, other=0)
                valid = valid & (key_ok[None, :] != 0)
            s = tl.where(valid, s, float("-inf"))

            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # still empty row: keep every exponent finite
            alpha = tl.exp(m_i - m_use)
            p = tl.exp(s - m_use[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new

    nonempty = l_i > 0.0
    o = acc / tl.where(nonempty, l_i, 1.0)[:, None]
    lse = tl.where(nonempty, m_i + tl.log(tl.where(nonempty, l_i, 1.0)), 0.0)
    tl.store(o_ptr + q_rows[:, None] * D + offs_d[None, :], o.to(o_ptr.dtype.element_ty), mask=row_mask)
    tl.store(lse_ptr + pid_bh.to(tl.int64) * T + offs_m, lse, mask=m_row)


@triton.jit
def _bsa_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, idx_ptr, cnt_ptr, kmask_ptr,
    T, NB, BS, scale,
    H: tl.constexpr, H_KV: tl.constexpr, D: tl.constexpr, SUBS_M: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_MASK: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    h_kv = h // (H // H_KV)
    i = pid_m // SUBS_M
    local_m = (pid_m % SUBS_M) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_m = i * BS + local_m
    m_row = (local_m < BS) & (offs_m < T)
    offs_d = tl.arange(0, BLOCK_D)
    m_d = offs_d < D
    q_rows = (b * T + offs_m) * H + h
    row_mask = m_row[:, None] & m_d[None, :]
    q = tl.load(q_ptr + q_rows[:, None] * D + offs_d[None, :], mask=row_mask, other=0.0)
    do = tl.load(do_ptr + q_rows[:, None] * D + offs_d[None, :], mask=row_mask, other=0.0)
    stat_offs = pid_bh.to(tl.int64) * T + offs_m
    lse = tl.load(lse_ptr + stat_offs, mask=m_row, other=0.0)
    delta = tl.load(delta_ptr + stat_offs, mask=m_row, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    list_at = pid_bh.to(tl.int64) * NB + i
    count = tl.load(cnt_ptr + list_at)
    for t in range(0, count):
        j = tl.load(idx_ptr + list_at * NB + t)
        for n_sub in range(0, BS, BLOCK_N):
            local_n = n_sub + tl.arange(0, BLOCK_N)
            offs_n = j * BS + local_n
            m_col = (local_n < BS) & (offs_n < T)
            kv_rows = (b * T + offs_n) * H_KV + h_kv
            kv_mask = m_col[:, None] & m_d[None, :]
            k = tl.load(k_ptr + kv_rows[:, None] * D + offs_d[None, :], mask=kv_mask, other=0.0)
            v = tl.load(v_ptr + kv_rows[:, None] * D + offs_d[None, :], mask=kv_mask, other=0.0)

            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
            valid = (offs_n[None, :] <= offs_m[:, None]) & m_col[None, :] & m_row[:, None]
            if HAS_MASK:
                key_ok = tl.load(kmask_ptr + b * T + offs_n, mask=m_col, other=0)
                valid = valid & (key_ok[None, :] != 0)
            p = tl.where(valid, tl.exp(tl.where(valid, s, 0.0) - lse[:, None]), 0.0)
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)

    tl.store(dq_ptr + q_rows[:, None] * D + offs_d[None, :], (dq * scale).to(dq_ptr.dtype.element_ty), mask=row_mask)


@triton.jit
def _bsa_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, ridx_ptr, rcnt_ptr, kmask_ptr,
    T, NB, BS, scale,
    H: tl.constexpr, H_KV: tl.constexpr, D: tl.constexpr, SUBS_N: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_MASK: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H_KV).to(tl.int64)
    h_kv = pid_bh % H_KV
    G: tl.constexpr = H // H_KV
    j = pid_n // SUBS_N  # key block
    local_n = (pid_n % SUBS_N) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_n = j * BS + local_n
    m_col = (local_n < BS) & (offs_n < T)
    offs_d = tl.arange(0, BLOCK_D)
    m_d = offs_d < D
    kv_rows = (b * T + offs_n) * H_KV + h_kv
    kv_mask = m_col[:, None] & m_d[None, :]
    k = tl.load(k_ptr + kv_rows[:, None] * D + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(v_ptr + kv_rows[:, None] * D + offs_d[None, :], mask=kv_mask, other=0.0)
    key_valid = m_col
    if HAS_MASK:
        key_ok = tl.load(kmask_ptr + b * T + offs_n, mask=m_col, other=0)
        key_valid = key_valid & (key_ok != 0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    for g in range(0, G):
        bh = b * H + h_kv * G + g
        list_at = bh * NB + j  # (b, h, j) in the reverse counts / lists
        count = tl.load(rcnt_ptr + list_at)
        for t in range(0, count):
            i = tl.load(ridx_ptr + list_at * NB + t)  # a query block that selected key block j (i >= j)
            for m_sub in range(0, BS, BLOCK_M):
                local_m = m_sub + tl.arange(0, BLOCK_M)
                offs_m = i * BS + local_m
                m_row = (local_m < BS) & (offs_m < T)
                q_rows = (b * T + offs_m) * H + h_kv * G + g
                row_mask = m_row[:, None] & m_d[None, :]
                q = tl.load(q_ptr + q_rows[:, None] * D + offs_d[None, :], mask=row_mask, other=0.0)
                do = tl.load(do_ptr + q_rows[:, None] * D + offs_d[None, :], mask=row_mask, other=0.0)
                lse = tl.load(lse_ptr + bh * T + offs_m, mask=m_row, other=0.0)
                delta = tl.load(delta_ptr + bh * T + offs_m, mask=m_row, other=0.0)

                s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION) * scale  # [BLOCK_N, BLOCK_M] = S^T
                valid = (offs_n[:, None] <= offs_m[None, :]) & key_valid[:, None] & m_row[None, :]
                p_t = tl.where(valid, tl.exp(tl.where(valid, s_t, 0.0) - lse[None, :]), 0.0)
                dv += tl.dot(p_t.to(do.dtype), do, input_precision=PRECISION)
                dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
                ds_t = p_t * (dp_t - delta[None, :])
                dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PRECISION)

    tl.store(dk_ptr + kv_rows[:, None] * D + offs_d[None, :], (dk * scale).to(dk_ptr.dtype.element_ty), mask=kv_mask)
    tl.store(dv_ptr + kv_rows[:, None] * D + offs_d[None, :], dv.to(dv_ptr.dtype.element_ty), mask=kv_mask)


def _config(block_size: int, D: int) -> tuple[int, int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_D, query tiles per block, key tiles per block, num_warps)."""
    span = max(16, triton.next_power_of_2(block_size))
    bm = max(16, min(int(BLOCK_M), span))
    bn = max(16, min(int(BLOCK_N), span))
    bd = max(16, triton.next_power_of_2(D))
    num_warps = 4 if bd <= 64 else 8
    return bm, bn, bd, triton.cdiv(block_size, bm), triton.cdiv(block_size, bn), num_warps


def _precision(dtype: torch.dtype) -> str:
    """Dot input precision: full IEEE for fp32 / fp64 (no tf32 rounding); 16-bit dots ignore the setting."""
    return "ieee" if dtype in (torch.float32, torch.float64) else "tf32"


def block_lists(block_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward lists (key blocks per query block) and reverse lists (query blocks per key block), int32.

    Returns ``(indices [B, H, N, N], counts [B, H, N], reverse_indices [B, H, N, N], reverse_counts [B, H, N])``
    for the causal part (``j <= i``) of ``block_mask``.
    """
    n = block_mask.shape[-1]
    causal = block_mask & torch.ones(n, n, dtype=torch.bool, device=block_mask.device).tril()
    idx, cnt = selected_blocks(causal)
    ridx, rcnt = selected_blocks(causal.transpose(-1, -2))
    return tuple(x.to(torch.int32).contiguous() for x in (idx, cnt, ridx, rcnt))


class _BlockSparseFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, idx, cnt, ridx, rcnt, kmask, block_size, scale):
        B, T, H, D = q.shape
        H_kv = k.shape[2]
        dev = q.device
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        n = num_blocks(T, block_size)
        BM, BN, BD, subs_m, _, num_warps = _config(block_size, D)

        o = new_buffer(B, T, H, D, dtype=q.dtype, device=dev)
        lse = new_buffer(B, H, T, dtype=torch.float32, device=dev)
        if q.numel() > 0:
            _bsa_fwd_kernel[(n * subs_m, B * H)](
                q, k, v, o, lse, idx, cnt, kmask if kmask is not None else cnt,
                T, n, block_size, scale,
                H=H, H_KV=H_kv, D=D, SUBS_M=subs_m, BLOCK_M=BM, BLOCK_N=BN, BLOCK_D=BD,
                HAS_MASK=kmask is not None, PRECISION=_precision(q.dtype), num_warps=num_warps, num_stages=1,
            )
        ctx.save_for_backward(q, k, v, o, lse, idx, cnt, ridx, rcnt, kmask)
        ctx.block_size, ctx.scale = block_size, scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, idx, cnt, ridx, rcnt, kmask = ctx.saved_tensors
        B, T, H, D = q.shape
        H_kv = k.shape[2]
        dev = q.device
        block_size, scale = ctx.block_size, ctx.scale
        n = num_blocks(T, block_size)
        BM, BN, BD, subs_m, subs_n, num_warps = _config(block_size, D)
        precision = _precision(q.dtype)
        do = do.to(q.dtype).contiguous()
        delta = (do.float() * o.float()).sum(-1).transpose(1, 2).contiguous()  # [B, H, T]

        dq = new_buffer(B, T, H, D, dtype=q.dtype, device=dev)
        dk = new_buffer(B, T, H_kv, D, dtype=k.dtype, device=dev)
        dv = new_buffer(B, T, H_kv, D, dtype=v.dtype, device=dev)
        if q.numel() > 0:
            masked = kmask is not None
            _bsa_bwd_dq_kernel[(n * subs_m, B * H)](
                q, k, v, do, lse, delta, dq, idx, cnt, kmask if masked else cnt,
                T, n, block_size, scale,
                H=H, H_KV=H_kv, D=D, SUBS_M=subs_m, BLOCK_M=BM, BLOCK_N=BN, BLOCK_D=BD,
                HAS_MASK=masked, PRECISION=precision, num_warps=num_warps, num_stages=1,
            )
            _bsa_bwd_dkdv_kernel[(n * subs_n, B * H_kv)](
                q, k, v, do, lse, delta, dk, dv, ridx, rcnt, kmask if masked else cnt,
                T, n, block_size, scale,
                H=H, H_KV=H_kv, D=D, SUBS_N=subs_n, BLOCK_M=BM, BLOCK_N=BN, BLOCK_D=BD,
                HAS_MASK=masked, PRECISION=precision, num_warps=num_warps, num_stages=1,
            )
        return dq, dk, dv, None, None, None, None, None, None, None


def triton_block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: torch.Tensor,
    block_size: int,
    scale: float | None = None,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Block-sparse causal attention with Triton forward and backward kernels; same contract as the naive version.

    q ``[B, T, H, D]``, k/v ``[B, T, H_kv, D]`` (``H % H_kv == 0``), block_mask bool ``[B, H, N, N]``
    (``N = ceil(T / block_size)``), scale (default ``D ** -0.5``), attention_mask ``[B, T]`` (0 = padding key) or
    None. Returns ``[B, T, H, D]`` in q's dtype; differentiable in q, k, v. Raises ``ValueError`` for inconsistent
    inputs (shared validation with the naive and chunked paths).
    """
    scale = validate_block_sparse_inputs(q, k, v, block_mask, block_size, scale, attention_mask)
    idx, cnt, ridx, rcnt = block_lists(block_mask)
    kmask = None
    if attention_mask is not None:
        kmask = (attention_mask != 0).to(torch.int32).contiguous()
    return _BlockSparseFunction.apply(q, k, v, idx, cnt, ridx, rcnt, kmask, int(block_size), float(scale))
