"""Causal sliding-window softmax attention with learnable sink logits in Triton: forward and backward kernels.

Same contract as :func:`naive_sliding_window_attention`: q ``[B, T, H, D]``, k/v ``[B, T, H_kv, D]`` (q head ``h``
uses kv head ``h // (H // H_kv)``); query ``t`` attends keys ``s`` with ``t - window < s <= t`` in its own packed
sequence (``cu_seqlens``, B == 1) whose ``attention_mask`` entry is non-zero; sink logits ``[H, S]`` join the
softmax denominator only. Softmax in fp32, output in q's dtype, a row with no key and no sink gives 0.

Design (flash-attention-2 style, written for this package)
-----------------------------------------------------------
* Forward: one program per (query block of ``BLOCK_M`` rows, batch * q head). It visits only the key blocks the
  band can reach, from ``max(0, q_start - window + 1, start of q_start's sequence)`` rounded down to a key block up
  to the block's last query, keeping an fp32 online softmax (running max ``m``, denominator ``l``, accumulator).
  The sinks seed the state: ``m = max_s sink_s``, ``l = sum_s exp(sink_s - m)``, accumulator 0. It stores the output
  and the per-row ``lse = m + log l`` (sinks included); an empty row (no key, no sink) stores 0 and ``lse = 0``.
* Masks: band ``t - window < s <= t``, key index ``< T``, same sequence as ``s >= seq_start[t]`` (sequences are
  contiguous and ``s <= t``), key padding from ``attention_mask``. Masked scores are ``-inf``; the running max is
  replaced by 0 while it is still ``-inf``, so no ``inf - inf`` appears.
* Backward: ``delta_t = sum_d dO_td O_td`` (torch); probabilities are recomputed as ``exp(s - lse)``.
  ``dq`` kernel: per query block, loop over the same key blocks: ``dS = P * (dO V^T - delta)``, ``dq = scale dS K``.
  It also writes the per-block partial sink gradient ``-sum_t exp(sink_s - lse_t) delta_t`` (summed in torch):
  a sink column has score ``sink_s`` and value 0, so ``dP_sink = 0`` and ``dsink_s = sum_t P_ts (0 - delta_t)``.
  ``dk/dv`` kernel: per (key block, batch * kv head), loop over the ``H // H_kv`` q heads of the group and the query
  blocks that see the key block (``k_start .. k_end + window - 1``, cut at the sequence end): ``dv += P^T dO``,
  ``dk += scale dS^T Q``; GQA is summed in registers, no per-q-head copies.
* ``D`` is padded to a power of two >= 16 (``BLOCK_D``) and masked; every load and store is masked. fp32 inputs use
  IEEE fp32 dots (no tf32); fp16 inputs use fp16 dots with fp32 accumulation (P and dS rounded to fp16 for the
  second matmul, as in flash-attention).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..buffers import new_buffer
from .naive import sequence_ids, validate_sliding_window_inputs

__all__ = ["triton_sliding_window_attention"]

# Largest query / key block (rows of one program's tile); the wrapper shrinks them for short sequences. Powers of two
# >= 16 (tests set them to 16 to exercise many blocks on tiny inputs).
BLOCK_M = 64
BLOCK_N = 64


@triton.jit
def _swa_fwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, sink_ptr, start_ptr, kmask_ptr,
    T, window, scale,
    H: tl.constexpr, H_KV: tl.constexpr, D: tl.constexpr, S: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
    HAS_SINK: tl.constexpr, IS_VARLEN: tl.constexpr, HAS_MASK: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    h_kv = h // (H // H_KV)
    q_start = pid_m * BLOCK_M

    offs_m = q_start + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_row = offs_m < T
    m_d = offs_d < D
    q_rows = (b * T + offs_m) * H + h  # row index into [B * T * H]
    q = tl.load(q_ptr + q_rows[:, None] * D + offs_d[None, :], mask=m_row[:, None] & m_d[None, :], other=0.0)

    if HAS_SINK:
        offs_s = tl.arange(0, BLOCK_S)
        sinks = tl.load(sink_ptr + h * S + offs_s, mask=offs_s < S, other=float("-inf"))
        m_sink = tl.max(sinks, 0)
        m_i = tl.zeros([BLOCK_M], dtype=tl.float32) + m_sink
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32) + tl.sum(tl.exp(sinks - m_sink), 0)
    else:
        m_i = tl.zeros([BLOCK_M], dtype=tl.float32) + float("-inf")
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    lo = tl.maximum(q_start - window + 1, 0)
    if IS_VARLEN:
        seq_start = tl.load(start_ptr + offs_m, mask=m_row, other=0)
        lo = tl.maximum(lo, tl.min(tl.where(m_row, seq_start, T), 0))
    lo = (lo // BLOCK_N) * BLOCK_N
    hi = tl.minimum(q_start + BLOCK_M, T)

    for n_start in range(lo, hi, BLOCK_N):
        offs_n = n_start + tl.arange(0, BLOCK_N)
        m_col = offs_n < T
        kv_rows = (b * T + offs_n) * H_KV + h_kv
        kv_mask = m_col[:, None] & m_d[None, :]
        k = tl.load(k_ptr + kv_rows[:, None] * D + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_ptr + kv_rows[:, None] * D + offs_d[None, :], mask=kv_mask, other=0.0)

        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # [BLOCK_M, BLOCK_N] fp32
        dist = offs_m[:, None] - offs_n[None, :]
        valid = (dist >= 0) & (dist < window) & m_col[None, :]
        if IS_VARLEN:
            valid = valid & (offs_n[None, :] >= seq_start[:, None])
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
    tl.store(o_ptr + q_rows[:, None] * D + offs_d[None, :], o.to(o_ptr.dtype.element_ty),
             mask=m_row[:, None] & m_d[None, :])
    tl.store(lse_ptr + pid_bh.to(tl.int64) * T + offs_m, lse, mask=m_row)


@triton.jit
def _swa_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, sink_ptr, dsink_ptr, start_ptr, kmask_ptr,
    T, window, scale,
    H: tl.constexpr, H_KV: tl.constexpr, D: tl.constexpr, S: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
    HAS_SINK: tl.constexpr, IS_VARLEN: tl.constexpr, HAS_MASK: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    h_kv = h // (H // H_KV)
    q_start = pid_m * BLOCK_M

    offs_m = q_start + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_row = offs_m < T
    m_d = offs_d < D
    q_rows = (b * T + offs_m) * H + h
    row_mask = m_row[:, None] & m_d[None, :]
    q = tl.load(q_ptr + q_rows[:, None] * D + offs_d[None, :], mask=row_mask, other=0.0)
    do = tl.load(do_ptr + q_rows[:, None] * D + offs_d[None, :], mask=row_mask, other=0.0)
    stat_offs = pid_bh.to(tl.int64) * T + offs_m
    lse = tl.load(lse_ptr + stat_offs, mask=m_row, other=0.0)
    delta = tl.load(delta_ptr + stat_offs, mask=m_row, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    lo = tl.maximum(q_start - window + 1, 0)
    if IS_VARLEN:
        seq_start = tl.load(start_ptr + offs_m, mask=m_row, other=0)
        lo = tl.maximum(lo, tl.min(tl.where(m_row, seq_start, T), 0))
    lo = (lo // BLOCK_N) * BLOCK_N
    hi = tl.minimum(q_start + BLOCK_M, T)

    for n_start in range(lo, hi, BLOCK_N):
        offs_n = n_start + tl.arange(0, BLOCK_N)
        m_col = offs_n < T
        kv_rows = (b * T + offs_n) * H_KV + h_kv
        kv_mask = m_col[:, None] & m_d[None, :]
        k = tl.load(k_ptr + kv_rows[:, None] * D + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_ptr + kv_rows[:, None] * D + offs_d[None, :], mask=kv_mask, other=0.0)

        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
        dist = offs_m[:, None] - offs_n[None, :]
        valid = (dist >= 0) & (dist < window) & m_col[None, :] & m_row[:, None]
        if IS_VARLEN:
            valid = valid & (offs_n[None, :] >= seq_start[:, None])
        if HAS_MASK:
            key_ok = tl.load(kmask_ptr + b * T + offs_n, mask=m_col, other=0)
            valid = valid & (key_ok[None, :] != 0)
        p = tl.where(valid, tl.exp(tl.where(valid, s, 0.0) - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)

    tl.store(dq_ptr + q_rows[:, None] * D + offs_d[None, :], (dq * scale).to(dq_ptr.dtype.element_ty), mask=row_mask)

    if HAS_SINK:
        # Sink column s: score sink_s, value 0 -> dP = 0, dsink_s = sum_t P_ts * (0 - delta_t).
        offs_s = tl.arange(0, BLOCK_S)
        m_s = offs_s < S
        sinks = tl.load(sink_ptr + h * S + offs_s, mask=m_s, other=0.0)
        both = m_row[:, None] & m_s[None, :]
        p_sink = tl.where(both, tl.exp(tl.where(both, sinks[None, :] - lse[:, None], 0.0)), 0.0)
        part = -tl.sum(p_sink * delta[:, None], 0)  # [BLOCK_S]
        n_blocks = tl.num_programs(0)
        tl.store(dsink_ptr + (pid_bh.to(tl.int64) * n_blocks + pid_m) * S + offs_s, part, mask=m_s)


@triton.jit
def _swa_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, start_ptr, end_ptr, kmask_ptr,
    T, window, scale,
    H: tl.constexpr, H_KV: tl.constexpr, D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    IS_VARLEN: tl.constexpr, HAS_MASK: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H_KV).to(tl.int64)
    h_kv = pid_bh % H_KV
    G: tl.constexpr = H // H_KV
    n_start = pid_n * BLOCK_N

    offs_n = n_start + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_col = offs_n < T
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

    lo = (n_start // BLOCK_M) * BLOCK_M
    hi = tl.minimum(n_start + BLOCK_N - 1 + window, T)  # queries t < last key + window
    if IS_VARLEN:
        seq_end = tl.load(end_ptr + offs_n, mask=m_col, other=0)
        hi = tl.minimum(hi, tl.max(tl.where(m_col, seq_end, 0), 0))

    for g in range(0, G):
        h = h_kv * G + g
        bh = (b * H + h) * T
        for m_start in range(lo, hi, BLOCK_M):
            offs_m = m_start + tl.arange(0, BLOCK_M)
            m_row = offs_m < T
            q_rows = (b * T + offs_m) * H + h
            row_mask = m_row[:, None] & m_d[None, :]
            q = tl.load(q_ptr + q_rows[:, None] * D + offs_d[None, :], mask=row_mask, other=0.0)
            do = tl.load(do_ptr + q_rows[:, None] * D + offs_d[None, :], mask=row_mask, other=0.0)
            lse = tl.load(lse_ptr + bh + offs_m, mask=m_row, other=0.0)
            delta = tl.load(delta_ptr + bh + offs_m, mask=m_row, other=0.0)

            s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION) * scale  # [BLOCK_N, BLOCK_M] = S^T
            dist = offs_m[None, :] - offs_n[:, None]
            valid = (dist >= 0) & (dist < window) & key_valid[:, None] & m_row[None, :]
            if IS_VARLEN:
                seq_start = tl.load(start_ptr + offs_m, mask=m_row, other=0)
                valid = valid & (offs_n[:, None] >= seq_start[None, :])
            p_t = tl.where(valid, tl.exp(tl.where(valid, s_t, 0.0) - lse[None, :]), 0.0)
            dv += tl.dot(p_t.to(do.dtype), do, input_precision=PRECISION)
            dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
            ds_t = p_t * (dp_t - delta[None, :])
            dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PRECISION)

    tl.store(dk_ptr + kv_rows[:, None] * D + offs_d[None, :], (dk * scale).to(dk_ptr.dtype.element_ty), mask=kv_mask)
    tl.store(dv_ptr + kv_rows[:, None] * D + offs_d[None, :], dv.to(dv_ptr.dtype.element_ty), mask=kv_mask)


def _config(T: int, D: int, S: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_S, num_warps): power-of-two tiles >= 16, no larger than T needs."""
    span = max(16, triton.next_power_of_2(max(T, 1)))
    bm = max(16, min(int(BLOCK_M), span))
    bn = max(16, min(int(BLOCK_N), span))
    bd = max(16, triton.next_power_of_2(D))
    bs = max(16, triton.next_power_of_2(max(S, 1)))
    num_warps = 4 if bd <= 64 else 8
    return bm, bn, bd, bs, num_warps


def _precision(dtype: torch.dtype) -> str:
    """Dot input precision: full IEEE for fp32 / fp64 (no tf32 rounding); 16-bit dots ignore the setting."""
    return "ieee" if dtype in (torch.float32, torch.float64) else "tf32"


class _SlidingWindowFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, sinks, window, scale, starts, ends, kmask):
        B, T, H, D = q.shape
        H_kv = k.shape[2]
        dev = q.device
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        has_sink = sinks is not None
        S = sinks.shape[1] if has_sink else 0
        sink_f = sinks.detach().float().contiguous() if has_sink else None
        ctx.sink_dtype = sinks.dtype if has_sink else None
        BM, BN, BD, BS, num_warps = _config(T, D, S)
        precision = _precision(q.dtype)
        window = min(window, max(T, 1))  # a window beyond T changes nothing; keeps it a small int

        o = new_buffer(B, T, H, D, dtype=q.dtype, device=dev)
        lse = new_buffer(B, H, T, dtype=torch.float32, device=dev)
        if q.numel() > 0:
            _swa_fwd_kernel[(triton.cdiv(T, BM), B * H)](
                q, k, v, o, lse, sink_f if has_sink else lse, starts if starts is not None else lse,
                kmask if kmask is not None else lse,
                T, window, scale,
                H=H, H_KV=H_kv, D=D, S=S, BLOCK_M=BM, BLOCK_N=BN, BLOCK_D=BD, BLOCK_S=BS,
                HAS_SINK=has_sink, IS_VARLEN=starts is not None, HAS_MASK=kmask is not None, PRECISION=precision,
                num_warps=num_warps, num_stages=1,
            )
        ctx.save_for_backward(q, k, v, o, lse, sink_f, starts, ends, kmask)
        ctx.window, ctx.scale = window, scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, sink_f, starts, ends, kmask = ctx.saved_tensors
        B, T, H, D = q.shape
        H_kv = k.shape[2]
        dev = q.device
        has_sink = sink_f is not None
        S = sink_f.shape[1] if has_sink else 0
        BM, BN, BD, BS, num_warps = _config(T, D, S)
        precision = _precision(q.dtype)
        window, scale = ctx.window, ctx.scale
        do = do.to(q.dtype).contiguous()
        delta = (do.float() * o.float()).sum(-1).transpose(1, 2).contiguous()  # [B, H, T]

        dq = new_buffer(B, T, H, D, dtype=q.dtype, device=dev)
        dk = new_buffer(B, T, H_kv, D, dtype=k.dtype, device=dev)
        dv = new_buffer(B, T, H_kv, D, dtype=v.dtype, device=dev)
        n_mblocks = triton.cdiv(T, BM)
        dsink_part = new_buffer(B * H, n_mblocks, S, dtype=torch.float32, device=dev) if has_sink else None
        if q.numel() > 0:
            varlen, masked = starts is not None, kmask is not None
            _swa_bwd_dq_kernel[(n_mblocks, B * H)](
                q, k, v, do, lse, delta, dq, sink_f if has_sink else lse, dsink_part if has_sink else lse,
                starts if varlen else lse, kmask if masked else lse,
                T, window, scale,
                H=H, H_KV=H_kv, D=D, S=S, BLOCK_M=BM, BLOCK_N=BN, BLOCK_D=BD, BLOCK_S=BS,
                HAS_SINK=has_sink, IS_VARLEN=varlen, HAS_MASK=masked, PRECISION=precision,
                num_warps=num_warps, num_stages=1,
            )
            _swa_bwd_dkdv_kernel[(triton.cdiv(T, BN), B * H_kv)](
                q, k, v, do, lse, delta, dk, dv,
                starts if varlen else lse, ends if varlen else lse, kmask if masked else lse,
                T, window, scale,
                H=H, H_KV=H_kv, D=D, BLOCK_M=BM, BLOCK_N=BN, BLOCK_D=BD,
                IS_VARLEN=varlen, HAS_MASK=masked, PRECISION=precision,
                num_warps=num_warps, num_stages=1,
            )
        dsink = None
        if has_sink:
            if q.numel() > 0:
                dsink = dsink_part.view(B, H, n_mblocks, S).sum((0, 2))
            else:
                dsink = torch.zeros(H, S, dtype=torch.float32, device=dev)
            dsink = dsink.to(ctx.sink_dtype)
        return dq, dk, dv, dsink, None, None, None, None, None


def triton_sliding_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int,
    sink_logits: torch.Tensor | None = None,
    scale: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal sliding-window attention with Triton forward and backward kernels; same contract as the naive version.

    q ``[B, T, H, D]``, k/v ``[B, T, H_kv, D]`` (``H % H_kv == 0``), ``window >= 1``, sink_logits ``[H, S]`` or None,
    scale (default ``D ** -0.5``), cu_seqlens ``[N + 1]`` (B == 1) or None, attention_mask ``[B, T]`` (0 = padding
    key) or None. Returns ``[B, T, H, D]`` in q's dtype; differentiable in q, k, v and sink_logits. Raises
    ``ValueError`` for inconsistent inputs (shared validation with the naive and chunked paths).
    """
    scale = validate_sliding_window_inputs(q, k, v, window, sink_logits, scale, cu_seqlens, attention_mask)
    T = q.shape[1]
    device = q.device
    starts = ends = kmask = None
    if cu_seqlens is not None:
        cu = cu_seqlens.to(device=device, dtype=torch.long)
        seq = sequence_ids(cu, T, device)
        starts = cu[seq].to(torch.int32).contiguous()
        ends = cu[seq + 1].to(torch.int32).contiguous()
    if attention_mask is not None:
        kmask = (attention_mask.to(device) != 0).to(torch.int32).contiguous()
    return _SlidingWindowFunction.apply(q, k, v, sink_logits, int(window), float(scale), starts, ends, kmask)
