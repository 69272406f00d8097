"""Gated delta rule (Gated DeltaNet) in Triton: recurrent forward and checkpointed recurrent backward.

Same contract as ``naive_recurrent_gated_delta_rule`` (fla layout): q, k ``[B, T, H, K]``; v ``[B, T, HV, V]`` with
``HV % H == 0``; g (log decay) and beta ``[B, T, HV]``; initial_state ``[N, HV, K, V]``; ``cu_seqlens`` ``[N + 1]``
(B == 1) packs N sequences, each starting from its own initial state. States are fp32 throughout.

Design
------
* One program per (V block, sequence * v-head). It holds the ``[BK, BV]`` fp32 state slice in registers and walks
  the sequence token by token. The delta rule updates each state column (V index) independently of the others, so
  splitting V over programs is exact; K stays whole in one program (padded to a power of two >= 16, masked).
* The forward stores the state entering every chunk of ``CHECKPOINT_CHUNK`` tokens (fp32 checkpoints).
* The backward walks the chunks in reverse: it re-runs the chunk forward from its checkpoint, writing the decayed
  state ``exp(g_t) S_{t-1}`` of every step to a per-program fp32 scratch buffer, then steps backward through the
  chunk carrying ``dS`` (seeded with the upstream gradient of the final state). ``dv`` is exact per V block; the
  ``dq``, ``dk``, ``dg``, ``dbeta`` contributions are partial sums over the V block, written per block and summed
  in torch (together with the sum over the v heads that share a q/k head under GVA; the kernels index the q/k head
  as ``hv // (HV // H)``).
* ``use_qk_l2norm`` is applied in torch (``_checks.l2norm``, in fp32) before the kernels; autograd differentiates it.

Memory: checkpoints take ``ceil(L / CHECKPOINT_CHUNK) * HV * K * V * 4`` bytes per sequence of length L; the backward
scratch takes ``NV * N * HV * CHECKPOINT_CHUNK * BK * BV * 4`` bytes. Forward and backward choose their V blocks
independently (``_blocks``: the backward holds about four state tiles, so it uses narrower blocks).

Testing: the CPU suite runs these kernels through the Triton interpreter (fp32 / fp16); both kernels also compile to
sm_90 cubins (fp16 / bf16 pointers) without register spills at K = V = 128, but have not been run on a GPU here.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..buffers import new_buffer
from ._checks import check_gated_delta_rule_inputs, l2norm

__all__ = ["triton_gated_delta_rule"]

# Tokens between two state checkpoints (forward) = length of the chunk the backward re-runs from one checkpoint.
CHECKPOINT_CHUNK = 16
# Upper bound on the V block of one program (the [BK, BV] fp32 state lives in registers).
MAX_BLOCK_V = 64
# Register budget of one program, in fp32 elements of a [BK, BV] tile: the forward holds one state tile, the backward
# about four (sm_90 with 4 warps: no spills at these sizes; larger K raises num_warps instead).
FWD_STATE_ELEMS = 4096
BWD_STATE_ELEMS = 2048


@triton.jit
def _gdr_fwd_kernel(
    q_ptr, k_ptr, v_ptr, g_ptr, beta_ptr, o_ptr, h0_ptr, ht_ptr, ckpt_ptr, cu_ptr, chunk_off_ptr, scale,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, C: tl.constexpr, USE_H0: tl.constexpr,
):
    i_v = tl.program_id(0)
    i_nh = tl.program_id(1)
    i_n = (i_nh // HV).to(tl.int64)
    i_hv = i_nh % HV
    i_h = i_hv // (HV // H)
    bos = tl.load(cu_ptr + i_n).to(tl.int64)
    eos = tl.load(cu_ptr + i_n + 1).to(tl.int64)
    c0 = tl.load(chunk_off_ptr + i_n).to(tl.int64)

    offs_k = tl.arange(0, BK)
    offs_v = i_v * BV + tl.arange(0, BV)
    mk = offs_k < K
    mv = offs_v < V
    mkv = mk[:, None] & mv[None, :]
    offs_kv = offs_k[:, None] * V + offs_v[None, :]

    state_base = (i_n * HV + i_hv) * K * V
    if USE_H0:
        S = tl.load(h0_ptr + state_base + offs_kv, mask=mkv, other=0.0).to(tl.float32)
    else:
        S = tl.zeros([BK, BV], dtype=tl.float32)

    n_chunks = tl.cdiv(eos - bos, C)
    for c in range(0, n_chunks):
        tl.store(ckpt_ptr + ((c0 + c) * HV + i_hv) * K * V + offs_kv, S, mask=mkv)
        for i in range(0, C):
            t = bos + c * C + i
            m = t < eos  # steps past the end load g = beta = 0 and leave S unchanged
            mk_t = offs_k < tl.where(m, K, 0)  # (scalar & vector masks trip the interpreter)
            mv_t = offs_v < tl.where(m, V, 0)
            qk_off = (t * H + i_h) * K + offs_k
            v_off = (t * HV + i_hv) * V + offs_v
            q_t = tl.load(q_ptr + qk_off, mask=mk_t, other=0.0).to(tl.float32)
            k_t = tl.load(k_ptr + qk_off, mask=mk_t, other=0.0).to(tl.float32)
            v_t = tl.load(v_ptr + v_off, mask=mv_t, other=0.0).to(tl.float32)
            g_t = tl.load(g_ptr + t * HV + i_hv, mask=m, other=0.0).to(tl.float32)
            b_t = tl.load(beta_ptr + t * HV + i_hv, mask=m, other=0.0).to(tl.float32)
            S = S * tl.exp(g_t)
            pred = tl.sum(S * k_t[:, None], axis=0)  # [BV]: S^T k
            u = b_t * (v_t - pred)
            S = S + k_t[:, None] * u[None, :]
            o_t = tl.sum(S * q_t[:, None], axis=0) * scale
            tl.store(o_ptr + v_off, o_t.to(o_ptr.dtype.element_ty), mask=mv_t)
    tl.store(ht_ptr + state_base + offs_kv, S, mask=mkv)


@triton.jit
def _gdr_bwd_kernel(
    q_ptr, k_ptr, v_ptr, g_ptr, beta_ptr, do_ptr, dht_ptr, ckpt_ptr, scratch_ptr,
    dq_ptr, dk_ptr, dv_ptr, dg_ptr, dbeta_ptr, dh0_ptr, cu_ptr, chunk_off_ptr, scale, TT,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, C: tl.constexpr, USE_DHT: tl.constexpr, STORE_DH0: tl.constexpr,
):
    i_v = tl.program_id(0)
    i_nh = tl.program_id(1)
    n_nh = tl.num_programs(1)
    i_n = (i_nh // HV).to(tl.int64)
    i_hv = i_nh % HV
    i_h = i_hv // (HV // H)
    bos = tl.load(cu_ptr + i_n).to(tl.int64)
    eos = tl.load(cu_ptr + i_n + 1).to(tl.int64)
    c0 = tl.load(chunk_off_ptr + i_n).to(tl.int64)

    offs_k = tl.arange(0, BK)
    offs_v = i_v * BV + tl.arange(0, BV)
    mk = offs_k < K
    mv = offs_v < V
    mkv = mk[:, None] & mv[None, :]
    offs_kv = offs_k[:, None] * V + offs_v[None, :]
    offs_blk = offs_k[:, None] * BV + tl.arange(0, BV)[None, :]  # scratch is padded: no mask needed
    scratch_base = (i_v.to(tl.int64) * n_nh + i_nh) * C * BK * BV
    # Per-V-block partial sums: dq / dk [NV, TT, HV, K], dg / dbeta [NV, TT, HV].
    part_qk = i_v.to(tl.int64) * TT * HV * K
    part_g = i_v.to(tl.int64) * TT * HV

    state_base = (i_n * HV + i_hv) * K * V
    if USE_DHT:
        dS = tl.load(dht_ptr + state_base + offs_kv, mask=mkv, other=0.0).to(tl.float32)
    else:
        dS = tl.zeros([BK, BV], dtype=tl.float32)

    n_chunks = tl.cdiv(eos - bos, C)
    for jc in range(0, n_chunks):
        c = n_chunks - 1 - jc
        # 1) re-run the chunk from its checkpoint; keep the decayed state exp(g_t) S_{t-1} of every step.
        S = tl.load(ckpt_ptr + ((c0 + c) * HV + i_hv) * K * V + offs_kv, mask=mkv, other=0.0)
        for i in range(0, C):
            t = bos + c * C + i
            m = t < eos
            mk_t = offs_k < tl.where(m, K, 0)
            mv_t = offs_v < tl.where(m, V, 0)
            k_t = tl.load(k_ptr + (t * H + i_h) * K + offs_k, mask=mk_t, other=0.0).to(tl.float32)
            v_t = tl.load(v_ptr + (t * HV + i_hv) * V + offs_v, mask=mv_t, other=0.0).to(tl.float32)
            g_t = tl.load(g_ptr + t * HV + i_hv, mask=m, other=0.0).to(tl.float32)
            b_t = tl.load(beta_ptr + t * HV + i_hv, mask=m, other=0.0).to(tl.float32)
            S = S * tl.exp(g_t)
            tl.store(scratch_ptr + scratch_base + i * BK * BV + offs_blk, S)
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
            v_off = (t * HV + i_hv) * V + offs_v
            q_t = tl.load(q_ptr + qk_off, mask=mk_t, other=0.0).to(tl.float32)
            k_t = tl.load(k_ptr + qk_off, mask=mk_t, other=0.0).to(tl.float32)
            v_t = tl.load(v_ptr + v_off, mask=mv_t, other=0.0).to(tl.float32)
            do_t = tl.load(do_ptr + v_off, mask=mv_t, other=0.0).to(tl.float32)
            g_t = tl.load(g_ptr + t * HV + i_hv, mask=m, other=0.0).to(tl.float32)
            b_t = tl.load(beta_ptr + t * HV + i_hv, mask=m, other=0.0).to(tl.float32)
            Sd = tl.load(scratch_ptr + scratch_base + i * BK * BV + offs_blk)  # exp(g_t) S_{t-1}
            r = v_t - tl.sum(Sd * k_t[:, None], axis=0)  # v - S'^T k
            u = b_t * r
            S_t = Sd + k_t[:, None] * u[None, :]
            dq_t = tl.sum(S_t * do_t[None, :], axis=1) * scale
            dS = dS + scale * q_t[:, None] * do_t[None, :]
            du = tl.sum(dS * k_t[:, None], axis=0)
            dk_t = tl.sum(dS * u[None, :], axis=1)
            db_t = tl.sum(du * r, axis=0)
            dv_t = b_t * du
            dS = dS - k_t[:, None] * dv_t[None, :]  # gradient w.r.t. S' = exp(g_t) S_{t-1}
            dk_t = dk_t - tl.sum(Sd * dv_t[None, :], axis=1)
            dg_t = tl.sum(tl.sum(dS * Sd, axis=1), axis=0)
            dS = dS * tl.exp(g_t)
            dqk_off = part_qk + (t * HV + i_hv) * K + offs_k  # per v head: GVA groups are summed in torch
            tl.store(dq_ptr + dqk_off, dq_t, mask=mk_t)
            tl.store(dk_ptr + dqk_off, dk_t, mask=mk_t)
            tl.store(dv_ptr + v_off, dv_t, mask=mv_t)
            tl.store(dg_ptr + part_g + t * HV + i_hv, dg_t, mask=m)
            tl.store(dbeta_ptr + part_g + t * HV + i_hv, db_t, mask=m)
        tl.debug_barrier()  # the next chunk overwrites the scratch
    if STORE_DH0:
        tl.store(dh0_ptr + state_base + offs_kv, dS, mask=mkv)


def _blocks(K: int, V: int, budget: int) -> tuple[int, int, int, int]:
    """(BK, BV, number of V blocks, num_warps) for a program holding [BK, BV] fp32 tiles within ``budget`` elements."""
    BK = max(16, triton.next_power_of_2(K))
    BV = max(16, min(triton.next_power_of_2(V), MAX_BLOCK_V, budget // BK))
    num_warps = max(4, min(16, 4 * BK * BV // budget))
    return BK, BV, triton.cdiv(V, BV), num_warps


class _GatedDeltaRuleFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, beta, initial_state, scale, cu, lengths, out_dtype, chunk):
        B, T, H, K = q.shape
        HV, V = v.shape[2], v.shape[3]
        N = cu.numel() - 1
        dev = q.device
        q, k, v, g, beta = (x.contiguous() for x in (q, k, v, g, beta))
        n_chunks = (lengths + chunk - 1) // chunk
        chunk_off = torch.cumsum(n_chunks, 0) - n_chunks
        total_chunks = int(n_chunks.sum().item())
        BK, BV, NV, num_warps = _blocks(K, V, FWD_STATE_ELEMS)

        o = new_buffer(B, T, HV, V, dtype=out_dtype, device=dev)
        ht = new_buffer(N, HV, K, V, dtype=torch.float32, device=dev)
        ckpt = new_buffer(max(total_chunks, 1), HV, K, V, dtype=torch.float32, device=dev)
        h0 = initial_state.float().contiguous() if initial_state is not None else ht  # dummy pointer when unused
        _gdr_fwd_kernel[(NV, N * HV)](
            q, k, v, g, beta, o, h0, ht, ckpt, cu, chunk_off, scale,
            H=H, HV=HV, K=K, V=V, BK=BK, BV=BV, C=chunk, USE_H0=initial_state is not None,
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
        HV, V = v.shape[2], v.shape[3]
        N, TT, dev, chunk = cu.numel() - 1, B * T, q.device, ctx.chunk
        BK, BV, NV, num_warps = _blocks(K, V, BWD_STATE_ELEMS)  # independent of the forward's V split
        do = torch.zeros(v.shape, dtype=torch.float32, device=dev) if do is None else do.contiguous()
        store_dh0 = ctx.h0_dtype is not None

        f32 = torch.float32
        dq = new_buffer(NV, TT, HV, K, dtype=f32, device=dev)
        dk = new_buffer(NV, TT, HV, K, dtype=f32, device=dev)
        dv = new_buffer(B, T, HV, V, dtype=f32, device=dev)
        dg = new_buffer(NV, TT, HV, dtype=f32, device=dev)
        dbeta = new_buffer(NV, TT, HV, dtype=f32, device=dev)
        dh0 = new_buffer(N, HV, K, V, dtype=f32, device=dev) if store_dh0 else None
        scratch = new_buffer(NV * N * HV, chunk, BK, BV, dtype=f32, device=dev)
        dht_arg = dht.float().contiguous() if dht is not None else ckpt  # dummy pointer when unused
        _gdr_bwd_kernel[(NV, N * HV)](
            q, k, v, g, beta, do, dht_arg, ckpt, scratch,
            dq, dk, dv, dg, dbeta, dh0 if store_dh0 else scratch, cu, chunk_off, ctx.scale, TT,
            H=H, HV=HV, K=K, V=V, BK=BK, BV=BV, C=chunk, USE_DHT=dht is not None, STORE_DH0=store_dh0,
            num_warps=num_warps, num_stages=1,
        )
        G = HV // H
        dq = dq.sum(0).view(B, T, H, G, K).sum(3)
        dk = dk.sum(0).view(B, T, H, G, K).sum(3)
        dg = dg.sum(0).view(B, T, HV)
        dbeta = dbeta.sum(0).view(B, T, HV)
        return (
            dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dg.to(g.dtype), dbeta.to(beta.dtype),
            None if dh0 is None else dh0.to(ctx.h0_dtype), None, None, None, None, None,
        )


def triton_gated_delta_rule(
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
    """Gated delta rule with Triton forward and backward kernels. Same contract as ``naive_recurrent_gated_delta_rule``.

    ``S_t = exp(g_t) S_{t-1};  S_t += beta_t k_t (v_t - S_t^T k_t)^T;  o_t = scale S_t^T q_t`` (``scale`` defaults
    to ``K ** -0.5``). Shapes: q, k ``[B, T, H, K]``, v ``[B, T, HV, V]`` (``HV % H == 0``), g, beta ``[B, T, HV]``,
    initial_state ``[N, HV, K, V]``; ``cu_seqlens`` ``[N + 1]`` with ``B == 1`` packs N sequences.
    Returns ``(o [B, T, HV, V] in q's dtype, final_state [N, HV, K, V] fp32 or None)``.

    Differentiable in q, k, v, g, beta and initial_state (and through the final state). When ``use_qk_l2norm`` is
    set, q and k are L2-normalised over K in torch (fp32, ``_checks.l2norm``) before the kernels run, and autograd
    differentiates that normalisation. Raises ``ValueError`` for inconsistent inputs.
    """
    N = check_gated_delta_rule_inputs(q, k, v, g, beta, scale, initial_state, cu_seqlens)
    B, T, H, K = q.shape
    out_dtype = q.dtype
    if scale is None:
        scale = K ** -0.5
    if use_qk_l2norm:
        q, k = l2norm(q.float()), l2norm(k.float())
    if cu_seqlens is None:
        cu = torch.arange(0, B + 1, dtype=torch.int64, device=q.device) * T
    else:
        cu = cu_seqlens.to(device=q.device, dtype=torch.int64)
    lengths = cu[1:] - cu[:-1]
    assert lengths.numel() == N
    chunk = int(CHECKPOINT_CHUNK)
    if chunk < 1:
        raise ValueError(f"CHECKPOINT_CHUNK must be a positive int, got {CHECKPOINT_CHUNK!r}")
    o, ht = _GatedDeltaRuleFunction.apply(q, k, v, g, beta, initial_state, float(scale), cu, lengths, out_dtype, chunk)
    return o, (ht if output_final_state else None)
