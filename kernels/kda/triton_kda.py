"""Kimi Delta Attention in Triton: per-token recurrent forward and checkpointed recurrent backward.

Same contract as ``naive_recurrent_kda`` (fla layout): q, k, g ``[B, T, H, K]`` (g the per-channel log decay); v
``[B, T, H, V]``; beta ``[B, T, H]``; initial_state ``[N, H, K, V]``; ``cu_seqlens`` ``[N + 1]`` (B == 1) packs N
sequences, each starting from its own initial state. States are fp32 throughout.

This is the recurrent form (one token per step, the state in registers), not a chunked kernel: simple, exact, and
runnable under the Triton interpreter; on a GPU it is bound by the sequential walk over T.

Design
------
* One program per (V block, sequence * head). It holds the ``[BK, BV]`` fp32 state slice in registers and walks the
  sequence token by token: ``S' = exp(g_t)[:, None] * S``, ``u = beta (v - S'^T k)``, ``S = S' + k u^T``,
  ``o = scale S^T q``. Decay and delta update act on each state column (V index) independently, so splitting V over
  programs is exact; K stays whole in one program (padded to a power of two >= 16, masked).
* The forward stores the state entering every chunk of ``CHECKPOINT_CHUNK`` tokens (fp32 checkpoints).
* The backward walks the chunks in reverse: it re-runs the chunk forward from its checkpoint, writing the decayed
  state ``S'_t`` of every step to a per-program fp32 scratch buffer, then steps backward through the chunk carrying
  ``dS`` (seeded with the upstream gradient of the final state). Per step, with ``r = v - S'^T k``::

      dq = scale S_t do;  dS += scale q do^T;  du = dS^T k;  dk = dS u;  dbeta = du . r;  dv = beta du
      dS' = dS - k dv^T;  dk -= S' dv;  dg = sum_v dS' * S' (a K-vector);  dS_{t-1} = exp(g_t)[:, None] * dS'

  ``dv`` is exact per V block; ``dq``, ``dk``, ``dg`` (K-vectors) and ``dbeta`` are partial sums over the V block,
  written per block and summed in torch.
* ``use_qk_l2norm`` is applied in torch (``l2norm``, in fp32) before the kernels; autograd differentiates it.

Memory: checkpoints take ``ceil(L / CHECKPOINT_CHUNK) * H * K * V * 4`` bytes per sequence of length L; the backward
scratch takes ``NV * N * H * CHECKPOINT_CHUNK * BK * BV * 4`` bytes.

Testing: the CPU suite runs these kernels through the Triton interpreter (fp32 / fp16). Both kernels also compile
ahead of time to sm_90a cubins (bf16 pointers, triton 3.9) without register spills at K = V = 64 and 128 (fwd 241 /
195 registers, bwd 249 / 237), but have not been run on a GPU here.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..buffers import new_buffer
from ..delta_rule._checks import l2norm
from ._checks import check_kda_inputs

__all__ = ["triton_kda"]

# Tokens between two state checkpoints (forward) = length of the chunk the backward re-runs from one checkpoint.
CHECKPOINT_CHUNK = 16
# Upper bound on the V block of one program (the [BK, BV] fp32 state lives in registers).
MAX_BLOCK_V = 64
# Register budget of one program, in fp32 elements of a [BK, BV] tile: the forward holds one state tile, the backward
# about four.
FWD_STATE_ELEMS = 4096
BWD_STATE_ELEMS = 2048


@triton.jit
def _kda_fwd_kernel(
    q_ptr, k_ptr, v_ptr, g_ptr, beta_ptr, o_ptr, h0_ptr, ht_ptr, ckpt_ptr, cu_ptr, chunk_off_ptr, scale,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, C: tl.constexpr, USE_H0: tl.constexpr,
):
    i_v = tl.program_id(0)
    i_nh = tl.program_id(1)
    i_n = (i_nh // H).to(tl.int64)
    i_h = i_nh % H
    bos = tl.load(cu_ptr + i_n).to(tl.int64)
    eos = tl.load(cu_ptr + i_n + 1).to(tl.int64)
    c0 = tl.load(chunk_off_ptr + i_n).to(tl.int64)

    offs_k = tl.arange(0, BK)
    offs_v = i_v * BV + tl.arange(0, BV)
    mk = offs_k < K
    mv = offs_v < V
    mkv = mk[:, None] & mv[None, :]
    offs_kv = offs_k[:, None] * V + offs_v[None, :]

    state_base = (i_n * H + i_h) * K * V
    if USE_H0:
        S = tl.load(h0_ptr + state_base + offs_kv, mask=mkv, other=0.0).to(tl.float32)
    else:
        S = tl.zeros([BK, BV], dtype=tl.float32)

    n_chunks = tl.cdiv(eos - bos, C)
    for c in range(0, n_chunks):
        tl.store(ckpt_ptr + ((c0 + c) * H + i_h) * K * V + offs_kv, S, mask=mkv)
        for i in range(0, C):
            t = bos + c * C + i
            m = t < eos  # steps past the end load g = k = beta = 0 and leave S unchanged
            mk_t = offs_k < tl.where(m, K, 0)  # (scalar & vector masks trip the interpreter)
            mv_t = offs_v < tl.where(m, V, 0)
            qk_off = (t * H + i_h) * K + offs_k
            v_off = (t * H + i_h) * V + offs_v
            q_t = tl.load(q_ptr + qk_off, mask=mk_t, other=0.0).to(tl.float32)
            k_t = tl.load(k_ptr + qk_off, mask=mk_t, other=0.0).to(tl.float32)
            g_t = tl.load(g_ptr + qk_off, mask=mk_t, other=0.0).to(tl.float32)
            v_t = tl.load(v_ptr + v_off, mask=mv_t, other=0.0).to(tl.float32)
            b_t = tl.load(beta_ptr + t * H + i_h, mask=m, other=0.0).to(tl.float32)
            S = S * tl.exp(g_t)[:, None]  # per-channel decay: one factor per state row
            pred = tl.sum(S * k_t[:, None], axis=0)  # [BV]: S'^T k
            u = b_t * (v_t - pred)
            S = S + k_t[:, None] * u[None, :]
            o_t = tl.sum(S * q_t[:, None], axis=0) * scale
            tl.store(o_ptr + v_off, o_t.to(o_ptr.dtype.element_ty), mask=mv_t)
    tl.store(ht_ptr + state_base + offs_kv, S, mask=mkv)


@triton.jit
def _kda_bwd_kernel(
    q_ptr, k_ptr, v_ptr, g_ptr, beta_ptr, do_ptr, dht_ptr, ckpt_ptr, scratch_ptr,
    dq_ptr, dk_ptr, dv_ptr, dg_ptr, dbeta_ptr, dh0_ptr, cu_ptr, chunk_off_ptr, scale, TT,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, C: tl.constexpr, USE_DHT: tl.constexpr, STORE_DH0: tl.constexpr,
):
    i_v = tl.program_id(0)
    i_nh = tl.program_id(1)
    n_nh = tl.num_programs(1)
    i_n = (i_nh // H).to(tl.int64)
    i_h = i_nh % H
    bos = tl.load(cu_ptr + i_n).to(tl.int64)
    eos = tl.load(cu_ptr + i_n + 1).to(tl.int64)
    c0 = tl.load(chunk_off_ptr + i_n).to(tl.int64)

    offs_k = tl.arange(0, BK)
    offs_v = i_v * BV + tl.arange(0, BV)
    mk = offs_k < K
    mv = offs_v < V
    mkv = mk[:, None] & mv[None, :]
    offs_kv = offs_k[:, None] * V + offs_v[None, :]
    offs_blk = offs_k[:, None] * BV + tl.arange(0, BV)[None, :]  # this program's [BK, BV] scratch tile
    scratch_base = (i_v.to(tl.int64) * n_nh + i_nh) * C * BK * BV
    # Per-V-block partial sums: dq / dk / dg [NV, TT, H, K], dbeta [NV, TT, H].
    part_qk = i_v.to(tl.int64) * TT * H * K
    part_b = i_v.to(tl.int64) * TT * H

    state_base = (i_n * H + i_h) * K * V
    if USE_DHT:
        dS = tl.load(dht_ptr + state_base + offs_kv, mask=mkv, other=0.0).to(tl.float32)
    else:
        dS = tl.zeros([BK, BV], dtype=tl.float32)

    n_chunks = tl.cdiv(eos - bos, C)
    for jc in range(0, n_chunks):
        c = n_chunks - 1 - jc
        # 1) re-run the chunk from its checkpoint; keep the decayed state S'_t = exp(g_t) S_{t-1} of every step.
        S = tl.load(ckpt_ptr + ((c0 + c) * H + i_h) * K * V + offs_kv, mask=mkv, other=0.0)
        for i in range(0, C):
            t = bos + c * C + i
            m = t < eos
            mk_t = offs_k < tl.where(m, K, 0)
            mv_t = offs_v < tl.where(m, V, 0)
            qk_off = (t * H + i_h) * K + offs_k
            k_t = tl.load(k_ptr + qk_off, mask=mk_t, other=0.0).to(tl.float32)
            g_t = tl.load(g_ptr + qk_off, mask=mk_t, other=0.0).to(tl.float32)
            v_t = tl.load(v_ptr + (t * H + i_h) * V + offs_v, mask=mv_t, other=0.0).to(tl.float32)
            b_t = tl.load(beta_ptr + t * H + i_h, mask=m, other=0.0).to(tl.float32)
            S = S * tl.exp(g_t)[:, None]
            tl.store(scratch_ptr + scratch_base + i * BK * BV + offs_blk, S, mask=mkv)
            u = b_t * (v_t - tl.sum(S * k_t[:, None], axis=0))
            S = S + k_t[:, None] * u[None, :]
        tl.debug_barrier()
        # 2) step backward through the chunk carrying dS (steps past the end leave dS unchanged: all loads are 0).
        for j in range(0, C):
            i = C - 1 - j
            t = bos + c * C + i
            m = t < eos
            mk_t = offs_k < tl.where(m, K, 0)
            mv_t = offs_v < tl.where(m, V, 0)
            qk_off = (t * H + i_h) * K + offs_k
            v_off = (t * H + i_h) * V + offs_v
            q_t = tl.load(q_ptr + qk_off, mask=mk_t, other=0.0).to(tl.float32)
            k_t = tl.load(k_ptr + qk_off, mask=mk_t, other=0.0).to(tl.float32)
            g_t = tl.load(g_ptr + qk_off, mask=mk_t, other=0.0).to(tl.float32)
            v_t = tl.load(v_ptr + v_off, mask=mv_t, other=0.0).to(tl.float32)
            do_t = tl.load(do_ptr + v_off, mask=mv_t, other=0.0).to(tl.float32)
            b_t = tl.load(beta_ptr + t * H + i_h, mask=m, other=0.0).to(tl.float32)
            Sd = tl.load(scratch_ptr + scratch_base + i * BK * BV + offs_blk, mask=mkv, other=0.0)  # S'_t
            r = v_t - tl.sum(Sd * k_t[:, None], axis=0)  # v - S'^T k
            u = b_t * r
            S_t = Sd + k_t[:, None] * u[None, :]
            dq_t = tl.sum(S_t * do_t[None, :], axis=1) * scale
            dS = dS + scale * q_t[:, None] * do_t[None, :]
            du = tl.sum(dS * k_t[:, None], axis=0)
            dk_t = tl.sum(dS * u[None, :], axis=1)
            db_t = tl.sum(du * r, axis=0)
            dv_t = b_t * du
            dS = dS - k_t[:, None] * dv_t[None, :]  # gradient w.r.t. S'_t
            dk_t = dk_t - tl.sum(Sd * dv_t[None, :], axis=1)
            dg_t = tl.sum(dS * Sd, axis=1)  # [BK]: d/dg_t of exp(g_t)[:, None] * S_{t-1}
            dS = dS * tl.exp(g_t)[:, None]
            dqk_off = part_qk + qk_off
            tl.store(dq_ptr + dqk_off, dq_t, mask=mk_t)
            tl.store(dk_ptr + dqk_off, dk_t, mask=mk_t)
            tl.store(dg_ptr + dqk_off, dg_t, mask=mk_t)
            tl.store(dv_ptr + v_off, dv_t, mask=mv_t)
            tl.store(dbeta_ptr + part_b + t * H + i_h, db_t, mask=m)
        tl.debug_barrier()  # the next chunk overwrites the scratch
    if STORE_DH0:
        tl.store(dh0_ptr + state_base + offs_kv, dS, mask=mkv)


def _kda_blocks(K: int, V: int, budget: int) -> tuple[int, int, int, int]:
    """(BK, BV, number of V blocks, num_warps) for a program holding [BK, BV] fp32 tiles within ``budget`` elements."""
    BK = max(16, triton.next_power_of_2(K))
    BV = max(16, min(triton.next_power_of_2(V), MAX_BLOCK_V, budget // BK))
    num_warps = max(4, min(16, 4 * BK * BV // budget))
    return BK, BV, triton.cdiv(V, BV), num_warps


class _KDAFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, beta, initial_state, scale, cu, lengths, out_dtype, chunk):
        B, T, H, K = q.shape
        V = v.shape[3]
        N = cu.numel() - 1
        dev = q.device
        q, k, v, g, beta = (x.contiguous() for x in (q, k, v, g, beta))
        n_chunks = (lengths + chunk - 1) // chunk
        chunk_off = torch.cumsum(n_chunks, 0) - n_chunks
        total_chunks = int(n_chunks.sum().item())
        BK, BV, NV, num_warps = _kda_blocks(K, V, FWD_STATE_ELEMS)

        o = new_buffer(B, T, H, V, dtype=out_dtype, device=dev)
        ht = new_buffer(N, H, K, V, dtype=torch.float32, device=dev)
        ckpt = new_buffer(max(total_chunks, 1), H, K, V, dtype=torch.float32, device=dev)
        h0 = initial_state.float().contiguous() if initial_state is not None else ht  # dummy pointer when unused
        if N * H > 0:
            _kda_fwd_kernel[(NV, N * H)](
                q, k, v, g, beta, o, h0, ht, ckpt, cu, chunk_off, scale,
                H=H, K=K, V=V, BK=BK, BV=BV, C=chunk, USE_H0=initial_state is not None,
                num_warps=num_warps, num_stages=1,
            )
        ctx.save_for_backward(q, k, v, g, beta, ckpt, cu, chunk_off)
        ctx.scale, ctx.chunk = scale, chunk
        ctx.h0_dtype = None if initial_state is None else initial_state.dtype
        ctx.set_materialize_grads(False)
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, g, beta, ckpt, cu, chunk_off = ctx.saved_tensors
        B, T, H, K = q.shape
        V = v.shape[3]
        N, TT, dev, chunk = cu.numel() - 1, B * T, q.device, ctx.chunk
        BK, BV, NV, num_warps = _kda_blocks(K, V, BWD_STATE_ELEMS)  # independent of the forward's V split
        do = torch.zeros(v.shape, dtype=torch.float32, device=dev) if do is None else do.contiguous()
        store_dh0 = ctx.h0_dtype is not None

        f32 = torch.float32
        dq = new_buffer(NV, TT, H, K, dtype=f32, device=dev)
        dk = new_buffer(NV, TT, H, K, dtype=f32, device=dev)
        dg = new_buffer(NV, TT, H, K, dtype=f32, device=dev)
        dv = new_buffer(B, T, H, V, dtype=f32, device=dev)
        dbeta = new_buffer(NV, TT, H, dtype=f32, device=dev)
        dh0 = new_buffer(N, H, K, V, dtype=f32, device=dev) if store_dh0 else None
        scratch = new_buffer(max(NV * N * H, 1), chunk, BK, BV, dtype=f32, device=dev)
        dht_arg = dht.float().contiguous() if dht is not None else ckpt  # dummy pointer when unused
        if N * H > 0:
            _kda_bwd_kernel[(NV, N * H)](
                q, k, v, g, beta, do, dht_arg, ckpt, scratch,
                dq, dk, dv, dg, dbeta, dh0 if store_dh0 else scratch, cu, chunk_off, ctx.scale, TT,
                H=H, K=K, V=V, BK=BK, BV=BV, C=chunk, USE_DHT=dht is not None, STORE_DH0=store_dh0,
                num_warps=num_warps, num_stages=1,
            )
        return (
            dq.sum(0).view(q.shape).to(q.dtype), dk.sum(0).view(k.shape).to(k.dtype), dv.to(v.dtype),
            dg.sum(0).view(g.shape).to(g.dtype), dbeta.sum(0).view(beta.shape).to(beta.dtype),
            None if dh0 is None else dh0.to(ctx.h0_dtype), None, None, None, None, None,
        )


def triton_kda(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.LongTensor | None = None,
    use_qk_l2norm: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """KDA with Triton forward and backward kernels. Same contract as ``naive_recurrent_kda``.

    ``S' = exp(g_t)[:, None] * S_{t-1};  S_t = S' + beta_t k_t (v_t - S'^T k_t)^T;  o_t = scale S_t^T q_t``
    (``scale`` defaults to ``K ** -0.5``). Shapes: q, k, g ``[B, T, H, K]``, v ``[B, T, H, V]``, beta ``[B, T, H]``,
    initial_state ``[N, H, K, V]``; ``cu_seqlens`` ``[N + 1]`` with ``B == 1`` packs N sequences.
    Returns ``(o [B, T, H, V] in q's dtype, final_state [N, H, K, V] fp32 or None)``; accumulation is fp32.

    Differentiable in q, k, v, g, beta and initial_state (and through the final state). When ``use_qk_l2norm`` is
    set, q and k are L2-normalised over K in torch (fp32) before the kernels run, and autograd differentiates that
    normalisation. Raises ``ValueError`` for inconsistent inputs.
    """
    N = check_kda_inputs(q, k, v, g, beta, scale, initial_state, cu_seqlens)
    B, T, H, K = q.shape
    out_dtype = q.dtype
    if scale is None:
        scale = K ** -0.5
    if use_qk_l2norm:
        q, k = l2norm(q.float()), l2norm(k.float())
    if cu_seqlens is None:
        cu = torch.arange(0, B + 1, dtype=torch.int64, device=q.device) * T
    else:
        cu = cu_seqlens.to(device=q.device, dtype=torch.int64).contiguous()
    lengths = cu[1:] - cu[:-1]
    assert lengths.numel() == N
    chunk = int(CHECKPOINT_CHUNK)
    if chunk < 1:
        raise ValueError(f"CHECKPOINT_CHUNK must be a positive int, got {CHECKPOINT_CHUNK!r}")
    o, ht = _KDAFunction.apply(q, k, v, g, beta, initial_state, float(scale), cu, lengths, out_dtype, chunk)
    return o, (ht if output_final_state else None)
