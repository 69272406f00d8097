"""Gated Linear Attention in Triton: fused recurrent forward and backward kernels.

Same contract as :func:`naive_recurrent_gla` (fla layout): q, k, g ``[B, T, H, K]``, v ``[B, T, H, V]``, g the
log-space forget gate; ``S_t = Diag(exp(g_t)) S_{t-1} + k_t^T v_t``, ``o_t = scale * q_t S_t``; initial_state
``[N, H, K, V]``; ``cu_seqlens`` ``[N + 1]`` (B == 1) packs N sequences, each starting from its own initial state.

Design
------
* The recurrence acts on every state element (k, v) independently, so the state can be split over both K and V.
  One program per (V block, K block, sequence * head) holds its ``[BK, BV]`` state slice in registers (fp32, or
  fp64 for fp64 inputs) and walks its sequence token by token; sequence bounds come from ``cu`` in-kernel (without
  ``cu_seqlens`` the wrapper passes ``cu = [0, T, 2T, ...]`` over the flattened ``B * T`` tokens).
* Forward: ``o`` is a sum over K, so each K block writes a partial ``o`` (summed in torch when K is split; written
  straight in q's dtype when it is not). The final state is always stored (it is also needed by the backward).
* Backward, one kernel, two passes per program:
    1. forward direction, re-running the state from ``h0``: ``dq_t = scale * S_t do_t`` (partial over V blocks);
    2. reverse direction carrying ``dS`` (seeded with the upstream gradient of the final state):
       ``dS += scale q_t^T do_t``; ``dk_t = dS v_t`` (partial over V), ``dv_t = k_t dS`` (partial over K);
       ``dS *= exp(g_t)``; after the walk ``dS`` is ``dh0``.
  ``dg`` uses the identity (per state column, so it also holds per V block)::

      dg_t = sum_{s >= t, same sequence} (q_s * dq_s - k_s * dk_s)  +  sum_v dht * S_final

  accumulated in-kernel during pass 2 (pass 2 re-reads this program's own ``dq`` from pass 1), so the reverse cumsum
  never crosses a sequence boundary and no difference of long cumsums is formed. Derivation: with
  ``A_t = sum_v dS_t * S_t`` (dS_t the gradient w.r.t. S_t), ``dg_t = sum_v dS_t * exp(g_t) S_{t-1} = A_t - k_t dk_t``
  and ``A_t = dg_{t+1} + q_t dq_t`` (``A_last = sum_v dht * S_final + q dq``).
  Caveat: the terms of that sum are O(|q dq|) while ``dg`` shrinks with ``exp(g)``: with strong gates ``dg`` keeps an
  absolute error of a few ulps of ``|q dq|`` (relative RMS ~1e-4 in fp32 at g ~ -5; for g << -10 a large relative
  error on a near-zero gradient). Without an initial state the first step of a sequence has ``S_{t-1} = 0``, so its
  ``dg`` is stored as exactly 0 instead of the cancelled sum.
* Partial sums (``o`` over K blocks; ``dq``, ``dk``, ``dg`` over V blocks; ``dv`` over K blocks) are written per block
  to fp32 buffers and summed in torch. With the default caps (``MAX_BLOCK_K = MAX_BLOCK_V = 64``) K, V <= 64 give a
  single block. K and V need not be powers of two: blocks are padded to a power of two >= 16 and masked.

Testing: the CPU suite runs these kernels through the Triton interpreter (fp32 / fp16 / bf16 / fp64); not compiled or run on a GPU here.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..buffers import new_buffer
from ._checks import check_gla_inputs, compute_dtype

__all__ = ["triton_gla"]

# Upper bounds on the state block of one program (the [BK, BV] tile lives in registers; the backward holds two).
MAX_BLOCK_K = 64
MAX_BLOCK_V = 64


@triton.jit
def _gla_fwd_kernel(
    q_ptr, k_ptr, v_ptr, g_ptr, o_ptr, h0_ptr, ht_ptr, cu_ptr, scale_ptr, TT,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_H0: tl.constexpr, ACC: tl.constexpr,
):
    i_v = tl.program_id(0)
    i_k = tl.program_id(1)
    i_nh = tl.program_id(2)
    i_n = (i_nh // H).to(tl.int64)
    i_h = i_nh % H
    bos = tl.load(cu_ptr + i_n).to(tl.int64)
    eos = tl.load(cu_ptr + i_n + 1).to(tl.int64)
    scale = tl.load(scale_ptr).to(ACC)

    offs_k = i_k * BK + tl.arange(0, BK)
    offs_v = i_v * BV + tl.arange(0, BV)
    mk = offs_k < K
    mv = offs_v < V
    mkv = mk[:, None] & mv[None, :]
    offs_kv = offs_k[:, None] * V + offs_v[None, :]
    state_base = (i_n * H + i_h) * K * V
    o_base = i_k.to(tl.int64) * TT * H * V  # partial o of this K block

    if USE_H0:
        S = tl.load(h0_ptr + state_base + offs_kv, mask=mkv, other=0.0).to(ACC)
    else:
        S = tl.zeros([BK, BV], dtype=ACC)
    for t in range(bos, eos):
        qk_off = (t * H + i_h) * K + offs_k
        v_off = (t * H + i_h) * V + offs_v
        q_t = tl.load(q_ptr + qk_off, mask=mk, other=0.0).to(ACC)
        k_t = tl.load(k_ptr + qk_off, mask=mk, other=0.0).to(ACC)
        g_t = tl.load(g_ptr + qk_off, mask=mk, other=0.0).to(ACC)
        v_t = tl.load(v_ptr + v_off, mask=mv, other=0.0).to(ACC)
        S = S * tl.exp(g_t)[:, None] + k_t[:, None] * v_t[None, :]
        o_t = tl.sum(S * q_t[:, None], axis=0) * scale
        tl.store(o_ptr + o_base + v_off, o_t.to(o_ptr.dtype.element_ty), mask=mv)
    tl.store(ht_ptr + state_base + offs_kv, S.to(ht_ptr.dtype.element_ty), mask=mkv)


@triton.jit
def _gla_bwd_kernel(
    q_ptr, k_ptr, v_ptr, g_ptr, do_ptr, h0_ptr, ht_ptr, dht_ptr,
    dq_ptr, dk_ptr, dv_ptr, dg_ptr, dh0_ptr, cu_ptr, scale_ptr, TT,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_H0: tl.constexpr, USE_DHT: tl.constexpr, STORE_DH0: tl.constexpr, ACC: tl.constexpr,
):
    i_v = tl.program_id(0)
    i_k = tl.program_id(1)
    i_nh = tl.program_id(2)
    i_n = (i_nh // H).to(tl.int64)
    i_h = i_nh % H
    bos = tl.load(cu_ptr + i_n).to(tl.int64)
    eos = tl.load(cu_ptr + i_n + 1).to(tl.int64)
    scale = tl.load(scale_ptr).to(ACC)

    offs_k = i_k * BK + tl.arange(0, BK)
    offs_v = i_v * BV + tl.arange(0, BV)
    mk = offs_k < K
    mv = offs_v < V
    mkv = mk[:, None] & mv[None, :]
    offs_kv = offs_k[:, None] * V + offs_v[None, :]
    state_base = (i_n * H + i_h) * K * V
    part_k = i_v.to(tl.int64) * TT * H * K  # dq, dk, dg: partial sums over the V blocks
    part_v = i_k.to(tl.int64) * TT * H * V  # dv: partial sums over the K blocks

    # Pass 1 (forward in time): re-run the state, dq_t = scale * S_t do_t over this V block.
    if USE_H0:
        S = tl.load(h0_ptr + state_base + offs_kv, mask=mkv, other=0.0).to(ACC)
    else:
        S = tl.zeros([BK, BV], dtype=ACC)
    for t in range(bos, eos):
        qk_off = (t * H + i_h) * K + offs_k
        v_off = (t * H + i_h) * V + offs_v
        k_t = tl.load(k_ptr + qk_off, mask=mk, other=0.0).to(ACC)
        g_t = tl.load(g_ptr + qk_off, mask=mk, other=0.0).to(ACC)
        v_t = tl.load(v_ptr + v_off, mask=mv, other=0.0).to(ACC)
        do_t = tl.load(do_ptr + v_off, mask=mv, other=0.0).to(ACC)
        S = S * tl.exp(g_t)[:, None] + k_t[:, None] * v_t[None, :]
        dq_t = tl.sum(S * do_t[None, :], axis=1) * scale
        tl.store(dq_ptr + part_k + qk_off, dq_t.to(dq_ptr.dtype.element_ty), mask=mk)
    tl.debug_barrier()  # pass 2 re-reads dq (possibly from other threads of this program)

    # Pass 2 (reverse in time): carry dS; dg accumulates sum_{s >= t} (q dq - k dk) (+ the dht term).
    if USE_DHT:
        dS = tl.load(dht_ptr + state_base + offs_kv, mask=mkv, other=0.0).to(ACC)
        S_fin = tl.load(ht_ptr + state_base + offs_kv, mask=mkv, other=0.0).to(ACC)
        dg_acc = tl.sum(dS * S_fin, axis=1)
    else:
        dS = tl.zeros([BK, BV], dtype=ACC)
        dg_acc = tl.zeros([BK], dtype=ACC)
    for j in range(0, eos - bos):
        t = eos - 1 - j
        qk_off = (t * H + i_h) * K + offs_k
        v_off = (t * H + i_h) * V + offs_v
        q_t = tl.load(q_ptr + qk_off, mask=mk, other=0.0).to(ACC)
        k_t = tl.load(k_ptr + qk_off, mask=mk, other=0.0).to(ACC)
        g_t = tl.load(g_ptr + qk_off, mask=mk, other=0.0).to(ACC)
        v_t = tl.load(v_ptr + v_off, mask=mv, other=0.0).to(ACC)
        do_t = tl.load(do_ptr + v_off, mask=mv, other=0.0).to(ACC)
        dq_t = tl.load(dq_ptr + part_k + qk_off, mask=mk, other=0.0).to(ACC)
        dS = dS + (q_t * scale)[:, None] * do_t[None, :]
        dk_t = tl.sum(dS * v_t[None, :], axis=1)
        dv_t = tl.sum(dS * k_t[:, None], axis=0)
        dg_acc = dg_acc + q_t * dq_t - k_t * dk_t
        tl.store(dk_ptr + part_k + qk_off, dk_t.to(dk_ptr.dtype.element_ty), mask=mk)
        dg_t = dg_acc
        if not USE_H0:  # S_{t-1} = 0 at the first step: its dg is exactly 0 (the sum above only cancels to ~0)
            dg_t = tl.where(t > bos, dg_acc, 0.0)
        tl.store(dg_ptr + part_k + qk_off, dg_t.to(dg_ptr.dtype.element_ty), mask=mk)
        tl.store(dv_ptr + part_v + v_off, dv_t.to(dv_ptr.dtype.element_ty), mask=mv)
        dS = dS * tl.exp(g_t)[:, None]
    if STORE_DH0:
        tl.store(dh0_ptr + state_base + offs_kv, dS.to(dh0_ptr.dtype.element_ty), mask=mkv)


def _blocks(K: int, V: int) -> tuple[int, int, int, int, int]:
    """(BK, BV, number of K blocks, number of V blocks, num_warps)."""
    BK = max(16, min(triton.next_power_of_2(K), MAX_BLOCK_K))
    BV = max(16, min(triton.next_power_of_2(V), MAX_BLOCK_V))
    num_warps = 4 if BK * BV <= 4096 else 8
    return BK, BV, triton.cdiv(K, BK), triton.cdiv(V, BV), num_warps


class _GLAFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, initial_state, scale, cu, acc_dtype):
        B, T, H, K = q.shape
        V = v.shape[-1]
        N, TT, dev = cu.numel() - 1, B * T, q.device
        q, k, v, g = (x.contiguous() for x in (q, k, v, g))
        BK, BV, NK, NV, num_warps = _blocks(K, V)
        acc_tl = tl.float64 if acc_dtype == torch.float64 else tl.float32
        scale_t = torch.tensor([scale], dtype=acc_dtype, device=dev)

        o_part = new_buffer(NK, B, T, H, V, dtype=q.dtype if NK == 1 else acc_dtype, device=dev)
        ht = new_buffer(N, H, K, V, dtype=acc_dtype, device=dev)
        h0 = initial_state.to(acc_dtype).contiguous() if initial_state is not None else None
        if N * H > 0:
            _gla_fwd_kernel[(NV, NK, N * H)](
                q, k, v, g, o_part, ht if h0 is None else h0, ht, cu, scale_t, TT,
                H=H, K=K, V=V, BK=BK, BV=BV, USE_H0=h0 is not None, ACC=acc_tl,
                num_warps=num_warps, num_stages=1,
            )
        o = o_part[0] if NK == 1 else o_part.sum(0).to(q.dtype)
        ctx.save_for_backward(q, k, v, g, h0, ht, cu, scale_t)
        ctx.acc_dtype = acc_dtype
        ctx.h0_dtype = None if initial_state is None else initial_state.dtype
        ctx.set_materialize_grads(False)
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, g, h0, ht, cu, scale_t = ctx.saved_tensors
        B, T, H, K = q.shape
        V = v.shape[-1]
        N, TT, dev, acc = cu.numel() - 1, B * T, q.device, ctx.acc_dtype
        BK, BV, NK, NV, num_warps = _blocks(K, V)
        acc_tl = tl.float64 if acc == torch.float64 else tl.float32
        do = torch.zeros(v.shape, dtype=v.dtype, device=dev) if do is None else do.contiguous()
        dht = None if dht is None else dht.to(acc).contiguous()
        store_dh0 = ctx.h0_dtype is not None

        dq = new_buffer(NV, B, T, H, K, dtype=acc, device=dev)
        dk = new_buffer(NV, B, T, H, K, dtype=acc, device=dev)
        dg = new_buffer(NV, B, T, H, K, dtype=acc, device=dev)
        dv = new_buffer(NK, B, T, H, V, dtype=acc, device=dev)
        dh0 = new_buffer(N, H, K, V, dtype=acc, device=dev) if store_dh0 else None
        if N * H > 0:
            _gla_bwd_kernel[(NV, NK, N * H)](
                q, k, v, g, do, ht if h0 is None else h0, ht, ht if dht is None else dht,
                dq, dk, dv, dg, ht if dh0 is None else dh0, cu, scale_t, TT,
                H=H, K=K, V=V, BK=BK, BV=BV, USE_H0=h0 is not None, USE_DHT=dht is not None,
                STORE_DH0=store_dh0, ACC=acc_tl, num_warps=num_warps, num_stages=1,
            )
        return (
            dq.sum(0).to(q.dtype), dk.sum(0).to(k.dtype), dv.sum(0).to(v.dtype), dg.sum(0).to(g.dtype),
            None if dh0 is None else dh0.to(ctx.h0_dtype), None, None, None,
        )


def triton_gla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    scale: Optional[float] = None,
    initial_state: Optional[torch.Tensor] = None,
    output_final_state: bool = False,
    cu_seqlens: Optional[torch.LongTensor] = None,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Gated linear attention with Triton forward and backward kernels. Same contract as ``naive_recurrent_gla``.

    ``S_t = Diag(exp(g_t)) S_{t-1} + k_t^T v_t``, ``o_t = scale * q_t S_t`` (``scale`` defaults to ``K ** -0.5``).
    Shapes: q, k, g ``[B, T, H, K]``; v ``[B, T, H, V]``; initial_state ``[N, H, K, V]``; ``cu_seqlens`` ``[N + 1]``
    with ``B == 1`` packs N sequences. Returns ``(o [B, T, H, V] in q's dtype, final_state [N, H, K, V] fp32 or
    None)``; accumulation is fp32 (fp64, with an fp64 final state, when any input is fp64).

    Differentiable in q, k, v, g and initial_state, also through the final state. Raises ``ValueError`` for
    inconsistent inputs (``check_gla_inputs``).
    """
    check_gla_inputs(q, k, v, g, initial_state, cu_seqlens)
    B, T, H, K = q.shape
    if scale is None:
        scale = K**-0.5
    acc_dtype = compute_dtype(q, k, v, g, initial_state)
    if cu_seqlens is None:
        cu = torch.arange(0, B + 1, dtype=torch.int64, device=q.device) * T
    else:
        cu = cu_seqlens.to(device=q.device, dtype=torch.int64).contiguous()
    o, ht = _GLAFunction.apply(q, k, v, g, initial_state, float(scale), cu, acc_dtype)
    return o, (ht if output_final_state else None)
