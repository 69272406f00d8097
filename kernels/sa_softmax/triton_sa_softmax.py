"""Causal SA-Softmax attention in Triton: forward and backward kernels (flash-attention-2 style, written here).

Same contract as :func:`naive_sa_softmax_attention` (see there for the epsilon and tie conventions): q
``[B, T, H, D]``, k/v ``[B, T, H_kv, D]``, full causal self-attention, padding keys (``attention_mask == 0``)
excluded, math in fp32, output in q's dtype, an empty row gives 0.

Notation for one query row: ``x_s = scale q . k_s`` over attendable keys, ``m = max x``, ``l = sum e^{x - m}``,
``p_s = e^{x_s - m} / l``, weights ``w_s = c_s p_s`` with ``c_s = x_s`` (plain) or ``c_s = f_s = (x_s - a) / den``
(normalized; ``a = min(x_min, 0)``, ``b = max(0, x_max)``, ``den = max(b - a, EPS)``), ``o = sum_s w_s v_s``.

Forward (one pass over key tiles, online rescaling by the running max):
  plain:      ``o = (sum x e^{x-m} v) / l``
  normalized: f is affine in x once a, b are known, so accumulate ``U = sum e^{x-m} v``, ``X = sum x e^{x-m} v``
              and the running min / max (with the position of their first occurrence), then
              ``o = (X - a U) / (l den)``.
  Saved per row: ``lse = m + log l``; for normalized also a, b and the key positions ``ia`` / ``ib`` that a / b
  were taken from (-1 where a or b is the constant 0).

Backward, with ``g_s = dO . v_s`` and ``Delta = dO . o = sum_s g_s w_s``:
  ``dv_s = sum_t w_ts dO_t``.
  plain:      ``dx_s = p_s (g_s (1 + x_s) - Delta)``        (from ``d(x_r p_r)/dx_s = d_rs p_s + x_r p_r (d_rs - p_s)``)
  normalized: holding a, b fixed, ``dx_s = p_s (g_s (1/den + f_s) - Delta)``; through a and b,
              ``df/da = (-1 + k f) / den``, ``df/db = -k f / den`` (``k = [b - a > EPS]``: no gradient through a
              clamped span), hence ``dA = (k Delta - G) / den`` and ``dB = -k Delta / den`` with
              ``G = sum_s g_s p_s``; dA is added to ``dx`` at key ``ia``, dB at key ``ib`` (the subgradient of the
              row min / max, first occurrence).
  ``dq_t = scale sum_s dx_ts k_s``, ``dk_s = scale sum_t dx_ts q_t``.

Kernels: ``Delta`` comes from torch (``dO . o``). The dq kernel runs per query tile; in normalized mode it first
makes one pass over the causal key tiles to get ``G`` (it needs dO, so it cannot be saved by the forward), stores
``dA`` / ``dB`` per row, then a second pass forms ``dx`` and accumulates dq. The dk/dv kernel runs per
(key tile, batch * kv head), looping over the GQA group's q heads and the query tiles at or after the key tile,
reading the stored ``dA`` / ``dB``. A separate dk/dv kernel (rather than fp32 atomic adds from the dq kernel) keeps
the result deterministic, sums the GQA group in registers and needs no zero-filled fp32 scratch nor a cast pass.

Tiles are powers of two >= 16 (tl.dot); ``D`` is padded to ``BLOCK_D`` and masked; every load and store is masked.
fp32 inputs use IEEE fp32 dots; fp16/bf16 inputs use 16-bit dots with fp32 accumulation (the weights and dx are
rounded to the input dtype for the second matmul, as in flash-attention).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..buffers import new_buffer
from .naive import EPS, validate_sa_softmax_inputs

__all__ = ["triton_sa_softmax_attention"]

# Largest query / key tile; the wrapper shrinks them to T. Powers of two >= 16 (tests set them to 16).
BLOCK_M = 64
BLOCK_N = 64


@triton.jit
def _sa_fwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, a_ptr, b_ptr, ia_ptr, ib_ptr, kmask_ptr,
    T, scale, eps,
    H: tl.constexpr, H_KV: tl.constexpr, D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    NORMALIZED: tl.constexpr, HAS_MASK: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    h_kv = h // (H // H_KV)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_row = offs_m < T
    offs_d = tl.arange(0, BLOCK_D)
    m_d = offs_d < D
    q_rows = (b * T + offs_m) * H + h  # row index into [B * T * H]
    row_mask = m_row[:, None] & m_d[None, :]
    q = tl.load(q_ptr + q_rows[:, None] * D + offs_d[None, :], mask=row_mask, other=0.0)

    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) + float("-inf")
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc_x = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)  # sum x e^{x-m} v
    acc_u = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)  # sum e^{x-m} v (normalized only)
    lo = tl.zeros([BLOCK_M], dtype=tl.float32) + float("inf")
    hi = tl.zeros([BLOCK_M], dtype=tl.float32) + float("-inf")
    i_lo = tl.zeros([BLOCK_M], dtype=tl.int32) - 1
    i_hi = tl.zeros([BLOCK_M], dtype=tl.int32) - 1

    # Causal: the tile's last query row sees keys up to itself.
    end = tl.minimum((pid_m + 1) * BLOCK_M, T)
    for start_n in range(0, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        m_col = offs_n < T
        kv_rows = (b * T + offs_n) * H_KV + h_kv
        kv_mask = m_col[:, None] & m_d[None, :]
        k = tl.load(k_ptr + kv_rows[:, None] * D + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_ptr + kv_rows[:, None] * D + offs_d[None, :], mask=kv_mask, other=0.0)

        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # [BLOCK_M, BLOCK_N] fp32
        valid = (offs_n[None, :] <= offs_m[:, None]) & m_col[None, :]
        if HAS_MASK:
            key_ok = tl.load(kmask_ptr + b * T + offs_n, mask=m_col, other=0)
            valid = valid & (key_ok[None, :] != 0)
        x = tl.where(valid, s, 0.0)  # the weight factor: 0 (not -inf) on masked keys
        s = tl.where(valid, s, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # still empty row: keep every exponent finite
        alpha = tl.exp(m_i - m_use)
        p = tl.exp(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc_x = acc_x * alpha[:, None] + tl.dot((x * p).to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
        if NORMALIZED:
            acc_u = acc_u * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            # Running min / max with the first position holding them: tiles come in ascending key order, so a
            # later tile only takes over on a strict improvement.
            t_lo = tl.min(tl.where(valid, s, float("inf")), 1)
            t_hi = tl.max(s, 1)
            t_ilo = tl.min(tl.where(valid & (s == t_lo[:, None]), offs_n[None, :], 2147483647), 1)
            t_ihi = tl.min(tl.where(valid & (s == t_hi[:, None]), offs_n[None, :], 2147483647), 1)
            i_lo = tl.where(t_lo < lo, t_ilo, i_lo)
            lo = tl.minimum(lo, t_lo)
            i_hi = tl.where(t_hi > hi, t_ihi, i_hi)
            hi = tl.maximum(hi, t_hi)

    nonempty = l_i > 0.0
    l_safe = tl.where(nonempty, l_i, 1.0)
    stat_offs = pid_bh.to(tl.int64) * T + offs_m
    if NORMALIZED:
        a = tl.where(lo < 0.0, lo, 0.0)  # empty row: lo = +inf -> 0
        bb = tl.where(hi > 0.0, hi, 0.0)
        den = tl.where(bb - a > eps, bb - a, eps)
        o = (acc_x - a[:, None] * acc_u) / (l_safe * den)[:, None]
        tl.store(a_ptr + stat_offs, a, mask=m_row)
        tl.store(b_ptr + stat_offs, bb, mask=m_row)
        tl.store(ia_ptr + stat_offs, tl.where(lo < 0.0, i_lo, -1), mask=m_row)
        tl.store(ib_ptr + stat_offs, tl.where(hi > 0.0, i_hi, -1), mask=m_row)
    else:
        o = acc_x / l_safe[:, None]
    lse = tl.where(nonempty, m_i + tl.log(l_safe), 0.0)
    tl.store(o_ptr + q_rows[:, None] * D + offs_d[None, :], o.to(o_ptr.dtype.element_ty), mask=row_mask)
    tl.store(lse_ptr + stat_offs, lse, mask=m_row)


@triton.jit
def _sa_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, a_ptr, b_ptr, ia_ptr, ib_ptr, da_ptr, db_ptr, dq_ptr, kmask_ptr,
    T, scale, eps,
    H: tl.constexpr, H_KV: tl.constexpr, D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    NORMALIZED: tl.constexpr, HAS_MASK: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    h_kv = h // (H // H_KV)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_row = offs_m < T
    offs_d = tl.arange(0, BLOCK_D)
    m_d = offs_d < D
    q_rows = (b * T + offs_m) * H + h
    row_mask = m_row[:, None] & m_d[None, :]
    q = tl.load(q_ptr + q_rows[:, None] * D + offs_d[None, :], mask=row_mask, other=0.0)
    do = tl.load(do_ptr + q_rows[:, None] * D + offs_d[None, :], mask=row_mask, other=0.0)
    stat_offs = pid_bh.to(tl.int64) * T + offs_m
    lse = tl.load(lse_ptr + stat_offs, mask=m_row, other=0.0)
    delta = tl.load(delta_ptr + stat_offs, mask=m_row, other=0.0)
    end = tl.minimum((pid_m + 1) * BLOCK_M, T)

    if NORMALIZED:
        a = tl.load(a_ptr + stat_offs, mask=m_row, other=0.0)
        bb = tl.load(b_ptr + stat_offs, mask=m_row, other=0.0)
        ia = tl.load(ia_ptr + stat_offs, mask=m_row, other=-1)
        ib = tl.load(ib_ptr + stat_offs, mask=m_row, other=-1)
        live = bb - a > eps  # gradient through the span only where it is not clamped
        den = tl.where(live, bb - a, eps)
        # Pass 1: G = sum_s p_s g_s (needs dO, so it is not a forward statistic).
        g_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
        for start_n in range(0, end, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            m_col = offs_n < T
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
            g_sum += tl.sum(p * dp, 1)
        kd = tl.where(live, delta, 0.0)
        d_a = (kd - g_sum) / den
        d_b = -kd / den
        tl.store(da_ptr + stat_offs, d_a, mask=m_row)
        tl.store(db_ptr + stat_offs, d_b, mask=m_row)

    # Pass 2: dx per tile, dq += dx K.
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        m_col = offs_n < T
        kv_rows = (b * T + offs_n) * H_KV + h_kv
        kv_mask = m_col[:, None] & m_d[None, :]
        k = tl.load(k_ptr + kv_rows[:, None] * D + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_ptr + kv_rows[:, None] * D + offs_d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
        valid = (offs_n[None, :] <= offs_m[:, None]) & m_col[None, :] & m_row[:, None]
        if HAS_MASK:
            key_ok = tl.load(kmask_ptr + b * T + offs_n, mask=m_col, other=0)
            valid = valid & (key_ok[None, :] != 0)
        x = tl.where(valid, s, 0.0)
        p = tl.where(valid, tl.exp(x - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        if NORMALIZED:
            f = (x - a[:, None]) / den[:, None]
            ds = p * (dp * (1.0 / den[:, None] + f) - delta[:, None])
            # ia / ib are attendable keys (or -1), so the extra terms never land on a masked entry.
            ds += tl.where(offs_n[None, :] == ia[:, None], d_a[:, None], 0.0)
            ds += tl.where(offs_n[None, :] == ib[:, None], d_b[:, None], 0.0)
        else:
            ds = p * (dp * (1.0 + x) - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)

    tl.store(dq_ptr + q_rows[:, None] * D + offs_d[None, :], (dq * scale).to(dq_ptr.dtype.element_ty), mask=row_mask)


@triton.jit
def _sa_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, a_ptr, b_ptr, ia_ptr, ib_ptr, da_ptr, db_ptr, dk_ptr, dv_ptr,
    kmask_ptr,
    T, scale, eps,
    H: tl.constexpr, H_KV: tl.constexpr, D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    NORMALIZED: tl.constexpr, HAS_MASK: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H_KV).to(tl.int64)
    h_kv = pid_bh % H_KV
    G: tl.constexpr = H // H_KV
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_col = offs_n < T
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
    # Causal: only query tiles holding rows >= this tile's first key.
    first_m = (pid_n * BLOCK_N // BLOCK_M) * BLOCK_M

    for g in range(G):
        bh = b * H + h_kv * G + g
        for start_m in range(first_m, T, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            m_row = offs_m < T
            q_rows = (b * T + offs_m) * H + h_kv * G + g
            row_mask = m_row[:, None] & m_d[None, :]
            q = tl.load(q_ptr + q_rows[:, None] * D + offs_d[None, :], mask=row_mask, other=0.0)
            do = tl.load(do_ptr + q_rows[:, None] * D + offs_d[None, :], mask=row_mask, other=0.0)
            stat_offs = bh * T + offs_m
            lse = tl.load(lse_ptr + stat_offs, mask=m_row, other=0.0)
            delta = tl.load(delta_ptr + stat_offs, mask=m_row, other=0.0)

            s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION) * scale  # [BLOCK_N, BLOCK_M] = S^T
            valid = (offs_n[:, None] <= offs_m[None, :]) & key_valid[:, None] & m_row[None, :]
            x_t = tl.where(valid, s_t, 0.0)
            p_t = tl.where(valid, tl.exp(x_t - lse[None, :]), 0.0)
            dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
            if NORMALIZED:
                a = tl.load(a_ptr + stat_offs, mask=m_row, other=0.0)
                bb = tl.load(b_ptr + stat_offs, mask=m_row, other=0.0)
                ia = tl.load(ia_ptr + stat_offs, mask=m_row, other=-1)
                ib = tl.load(ib_ptr + stat_offs, mask=m_row, other=-1)
                d_a = tl.load(da_ptr + stat_offs, mask=m_row, other=0.0)
                d_b = tl.load(db_ptr + stat_offs, mask=m_row, other=0.0)
                den = tl.where(bb - a > eps, bb - a, eps)
                f_t = (x_t - a[None, :]) / den[None, :]
                w_t = f_t * p_t
                ds_t = p_t * (dp_t * (1.0 / den[None, :] + f_t) - delta[None, :])
                ds_t += tl.where(offs_n[:, None] == ia[None, :], d_a[None, :], 0.0)
                ds_t += tl.where(offs_n[:, None] == ib[None, :], d_b[None, :], 0.0)
            else:
                w_t = x_t * p_t
                ds_t = p_t * (dp_t * (1.0 + x_t) - delta[None, :])
            dv += tl.dot(w_t.to(do.dtype), do, input_precision=PRECISION)
            dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PRECISION)

    tl.store(dk_ptr + kv_rows[:, None] * D + offs_d[None, :], (dk * scale).to(dk_ptr.dtype.element_ty), mask=kv_mask)
    tl.store(dv_ptr + kv_rows[:, None] * D + offs_d[None, :], dv.to(dv_ptr.dtype.element_ty), mask=kv_mask)


def _config(T: int, D: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_D, num_warps)."""
    span = max(16, triton.next_power_of_2(max(T, 1)))
    bm = max(16, min(int(BLOCK_M), span))
    bn = max(16, min(int(BLOCK_N), span))
    bd = max(16, triton.next_power_of_2(D))
    return bm, bn, bd, 4 if bd <= 64 else 8


def _precision(dtype: torch.dtype) -> str:
    """Dot input precision: full IEEE for fp32 / fp64 (no tf32 rounding); 16-bit dots ignore the setting."""
    return "ieee" if dtype in (torch.float32, torch.float64) else "tf32"


class _SASoftmaxFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, kmask, normalized, scale):
        B, T, H, D = q.shape
        H_kv = k.shape[2]
        dev = q.device
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        BM, BN, BD, num_warps = _config(T, D)

        o = new_buffer(B, T, H, D, dtype=q.dtype, device=dev)
        lse = new_buffer(B, H, T, dtype=torch.float32, device=dev)
        if normalized:
            a = new_buffer(B, H, T, dtype=torch.float32, device=dev)
            b = new_buffer(B, H, T, dtype=torch.float32, device=dev)
            # Integer buffers cannot hold the NaN poison; the kernel stores every row of them.
            ia = torch.empty(B, H, T, dtype=torch.int32, device=dev)
            ib = torch.empty(B, H, T, dtype=torch.int32, device=dev)
        else:
            a = b = ia = ib = lse  # unused placeholders (the NORMALIZED branch is compiled out)
        if q.numel() > 0:
            _sa_fwd_kernel[(triton.cdiv(T, BM), B * H)](
                q, k, v, o, lse, a, b, ia, ib, kmask if kmask is not None else lse,
                T, scale, EPS,
                H=H, H_KV=H_kv, D=D, BLOCK_M=BM, BLOCK_N=BN, BLOCK_D=BD,
                NORMALIZED=normalized, HAS_MASK=kmask is not None, PRECISION=_precision(q.dtype),
                num_warps=num_warps, num_stages=1,
            )
        ctx.save_for_backward(q, k, v, o, lse, a, b, ia, ib, kmask)
        ctx.normalized, ctx.scale = normalized, scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, a, b, ia, ib, kmask = ctx.saved_tensors
        normalized, scale = ctx.normalized, ctx.scale
        B, T, H, D = q.shape
        H_kv = k.shape[2]
        dev = q.device
        BM, BN, BD, num_warps = _config(T, D)
        precision = _precision(q.dtype)
        do = do.to(q.dtype).contiguous()
        delta = (do.float() * o.float()).sum(-1).transpose(1, 2).contiguous()  # [B, H, T] = dO . o

        dq = new_buffer(B, T, H, D, dtype=q.dtype, device=dev)
        dk = new_buffer(B, T, H_kv, D, dtype=k.dtype, device=dev)
        dv = new_buffer(B, T, H_kv, D, dtype=v.dtype, device=dev)
        if normalized:
            d_a = new_buffer(B, H, T, dtype=torch.float32, device=dev)
            d_b = new_buffer(B, H, T, dtype=torch.float32, device=dev)
        else:
            d_a = d_b = lse
        if q.numel() > 0:
            masked = kmask is not None
            common = {
                "H": H, "H_KV": H_kv, "D": D, "BLOCK_M": BM, "BLOCK_N": BN, "BLOCK_D": BD,
                "NORMALIZED": normalized, "HAS_MASK": masked, "PRECISION": precision,
                "num_warps": num_warps, "num_stages": 1,
            }
            _sa_bwd_dq_kernel[(triton.cdiv(T, BM), B * H)](
                q, k, v, do, lse, delta, a, b, ia, ib, d_a, d_b, dq, kmask if masked else lse,
                T, scale, EPS, **common,
            )
            # Launched after the dq kernel: it reads the per-row dA / dB that kernel stored.
            _sa_bwd_dkdv_kernel[(triton.cdiv(T, BN), B * H_kv)](
                q, k, v, do, lse, delta, a, b, ia, ib, d_a, d_b, dk, dv, kmask if masked else lse,
                T, scale, EPS, **common,
            )
        return dq, dk, dv, None, None, None


def triton_sa_softmax_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    mode: str = "plain",
    scale: float | None = None,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal SA-Softmax attention with Triton forward and backward kernels; same contract as the naive version.

    q ``[B, T, H, D]``, k/v ``[B, T, H_kv, D]`` (``H % H_kv == 0``), ``mode`` in ``("plain", "normalized")``,
    scale (default ``D ** -0.5``), attention_mask ``[B, T]`` (0 = padding key) or None. Full causal self-attention
    only (no decode against a longer key prefix). Returns ``[B, T, H, D]`` in q's dtype; differentiable in q, k, v.
    Raises ``ValueError`` for inconsistent inputs (shared validation with the naive and chunked paths).
    """
    scale = validate_sa_softmax_inputs(q, k, v, mode, scale, attention_mask)
    kmask = None
    if attention_mask is not None:
        kmask = (attention_mask != 0).to(torch.int32).contiguous()
    return _SASoftmaxFunction.apply(q, k, v, kmask, mode == "normalized", float(scale))
