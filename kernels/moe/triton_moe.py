"""Grouped expert SwiGLU MLP in Triton: grouped-GEMM forward and backward kernels.

Same contract as :func:`naive_expert_mlp`: x ``[N, H]``, token_idx / expert_idx ``[A]``, gate_up ``[E, 2I, H]``
(gate rows, then up rows), down ``[E, H, I]``; ``y[a] = down[e] (silu(gate) * up)`` with ``gate, up = gate_up[e]
x[token_idx[a]]``, ``e = expert_idx[a]``; ``y`` ``[A, H]`` in assignment order.

Design
------
* Assignments are sorted by expert (:func:`sort_by_expert`, shared with the PyTorch path): expert ``e`` owns the
  sorted rows ``offsets[e]:offsets[e+1]``. A block schedule lists, per expert, ``ceil(count / BM)`` row blocks as
  ``(expert, row_start, row_end)``; every GEMM program takes one block, so experts without rows launch nothing
  and no block mixes two experts' weights.
* Forward, two kernels:
    1. ``_gate_up_swiglu_kernel``: ``[gate | up] = x[src] gate_up[e]^T`` for a block of sorted rows, reading
       ``x[src[row]]`` (``src = token_idx[order]``) straight from x, so no permuted copy of x exists. The epilogue
       writes ``h = silu(gate) * up`` (and the pre-activation ``[gate | up]`` when a backward will need it).
    2. ``_grouped_gemm_kernel``: ``y = h down[e]^T``; its store scatters row ``r`` to ``y[order[r]]`` (unpermute
       fused into the epilogue).
* Backward (upstream ``dy`` in assignment order):
    * ``dh = dy[order] down[e]`` (the same grouped GEMM, transposed weight strides, gathered A rows), then
      ``_swiglu_bwd_kernel`` turns ``dh`` and the saved pre-activation into ``d[gate | up]`` and recomputes ``h``
      (so the forward keeps only the pre-activation, not ``h``).
    * ``d down[e] = dy_e^T h_e`` and ``d gate_up[e] = d[gate | up]_e^T x[src]_e`` by ``_grouped_wgrad_kernel``,
      gridded over (non-empty expert, N block, K block), each program looping over its expert's rows. Experts
      with no rows launch no program; their weight gradients are zeroed in torch.
    * ``dx``: the grouped GEMM gives the per-assignment rows ``d[gate | up] gate_up[e]`` (fp32), summed into tokens
      with ``index_add_`` in torch. A token appears once per chosen expert, so an in-kernel scatter would need
      atomics (run-to-run varying summation order, and an fp32 side buffer for 16-bit x anyway). ``index_add_``
      keeps the kernels free of atomics and under torch's determinism settings, for one ``[A, H]`` fp32 buffer.
* Accumulation is fp32 (``tl.dot`` in IEEE precision for fp32 inputs: no tf32 rounding); intermediates (``h``,
  pre-activation, ``d[gate | up]``) are stored in x's dtype, like the PyTorch path. The weights are cast to x's
  dtype in the wrapper (autograd casts their gradients back). Every load and store is masked, so H and I need not
  be multiples of the blocks; blocks are fixed (no autotune: the interpreter cannot run several configs).
  Under the interpreter (triton 3.9) ``tl.dot`` on bf16 operands returns garbage, so there bf16 tiles are upcast
  to fp32 before the dot (``_dot_args``); compiled kernels dot bf16 directly.
* Building the schedule needs the number of blocks on the host (one device sync per call, like the PyTorch
  path's ``counts.tolist()``).

Testing: the CPU suite runs these kernels through the Triton interpreter (fp32 / fp16 / bf16); not compiled or run
on a GPU here.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..buffers import new_buffer
from .permute import sort_by_expert

__all__ = ["triton_grouped_expert_mlp"]


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """``tl.dot`` with fp32 accumulation; UPCAST runs it on fp32 copies (bf16 under the interpreter, see _dot_args)."""
    if UPCAST:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        out = tl.dot(a, b, input_precision=PRECISION)
    return out


@triton.jit
def _gate_up_swiglu_kernel(
    x_ptr, src_ptr, w_ptr, h_ptr, gu_ptr, blk_expert_ptr, blk_start_ptr, blk_end_ptr, H, I,
    STORE_GU: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """One (row block, I block): gate and up accumulators side by side, SwiGLU in the epilogue."""
    blk = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(blk_expert_ptr + blk).to(tl.int64)
    row_end = tl.load(blk_end_ptr + blk)
    rows = tl.load(blk_start_ptr + blk) + tl.arange(0, BM).to(tl.int64)
    m_row = rows < row_end
    src = tl.load(src_ptr + rows, mask=m_row, other=0).to(tl.int64)  # token of each sorted row: the fused gather
    offs_n = pid_n * BN + tl.arange(0, BN)
    m_n = offs_n < I
    w_gate = w_ptr + e * 2 * I * H + offs_n[None, :].to(tl.int64) * H  # gate_up[e, n, :] as columns
    w_up = w_gate + I * H  # gate_up[e, I + n, :]

    acc_gate = tl.zeros([BM, BN], dtype=tl.float32)
    acc_up = tl.zeros([BM, BN], dtype=tl.float32)
    for k0 in range(0, H, BK):
        offs_k = k0 + tl.arange(0, BK)
        m_k = offs_k < H
        a = tl.load(x_ptr + src[:, None] * H + offs_k[None, :], mask=m_row[:, None] & m_k[None, :], other=0.0)
        m_w = m_k[:, None] & m_n[None, :]
        wg = tl.load(w_gate + offs_k[:, None], mask=m_w, other=0.0)  # [BK, BN]
        wu = tl.load(w_up + offs_k[:, None], mask=m_w, other=0.0)
        acc_gate += _dot(a, wg, PRECISION, UPCAST)
        acc_up += _dot(a, wu, PRECISION, UPCAST)

    m_out = m_row[:, None] & m_n[None, :]
    h = acc_gate * tl.sigmoid(acc_gate) * acc_up
    tl.store(h_ptr + rows[:, None] * I + offs_n[None, :], h.to(h_ptr.dtype.element_ty), mask=m_out)
    if STORE_GU:
        gu_off = rows[:, None] * 2 * I + offs_n[None, :]
        tl.store(gu_ptr + gu_off, acc_gate.to(gu_ptr.dtype.element_ty), mask=m_out)
        tl.store(gu_ptr + gu_off + I, acc_up.to(gu_ptr.dtype.element_ty), mask=m_out)


@triton.jit
def _grouped_gemm_kernel(
    a_ptr, a_rows_ptr, w_ptr, y_ptr, y_rows_ptr, blk_expert_ptr, blk_start_ptr, blk_end_ptr, N, K,
    stride_we, stride_wn, stride_wk,
    GATHER_A: tl.constexpr, SCATTER_Y: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """``Y[y_row(r), n] = sum_k A[a_row(r), k] W[e, n, k]`` over one block of sorted rows r of expert e.

    A is ``[*, K]`` and Y ``[*, N]`` row-major; ``a_row``/``y_row`` are the identity or read from an index array
    (GATHER_A / SCATTER_Y). W is addressed through strides, so a transposed weight costs nothing.
    """
    blk = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(blk_expert_ptr + blk).to(tl.int64)
    row_end = tl.load(blk_end_ptr + blk)
    rows = tl.load(blk_start_ptr + blk) + tl.arange(0, BM).to(tl.int64)
    m_row = rows < row_end
    if GATHER_A:
        a_rows = tl.load(a_rows_ptr + rows, mask=m_row, other=0).to(tl.int64)
    else:
        a_rows = rows
    offs_n = pid_n * BN + tl.arange(0, BN)
    m_n = offs_n < N
    w_cols = w_ptr + e * stride_we + offs_n[None, :].to(tl.int64) * stride_wn

    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for k0 in range(0, K, BK):
        offs_k = k0 + tl.arange(0, BK)
        m_k = offs_k < K
        a = tl.load(a_ptr + a_rows[:, None] * K + offs_k[None, :], mask=m_row[:, None] & m_k[None, :], other=0.0)
        w = tl.load(w_cols + offs_k[:, None].to(tl.int64) * stride_wk, mask=m_k[:, None] & m_n[None, :], other=0.0)
        acc += _dot(a, w, PRECISION, UPCAST)

    if SCATTER_Y:
        y_rows = tl.load(y_rows_ptr + rows, mask=m_row, other=0).to(tl.int64)
    else:
        y_rows = rows
    tl.store(y_ptr + y_rows[:, None] * N + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=m_row[:, None] & m_n[None, :])


@triton.jit
def _swiglu_bwd_kernel(
    gu_ptr, dh_ptr, dgu_ptr, h_ptr, A, I, BM: tl.constexpr, BN: tl.constexpr,
):
    """``d[gate | up]`` from ``dh`` and the pre-activation; also recomputes ``h = silu(gate) * up``."""
    rows = tl.program_id(0) * BM + tl.arange(0, BM).to(tl.int64)
    offs_n = tl.program_id(1) * BN + tl.arange(0, BN)
    mask = (rows < A)[:, None] & (offs_n < I)[None, :]
    gu_off = rows[:, None] * 2 * I + offs_n[None, :]
    h_off = rows[:, None] * I + offs_n[None, :]
    gate = tl.load(gu_ptr + gu_off, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gu_ptr + gu_off + I, mask=mask, other=0.0).to(tl.float32)
    dh = tl.load(dh_ptr + h_off, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(gate)
    silu = gate * sig
    d_gate = dh * up * sig * (1.0 + gate * (1.0 - sig))  # silu'(g) = sig(g) (1 + g (1 - sig(g)))
    tl.store(dgu_ptr + gu_off, d_gate.to(dgu_ptr.dtype.element_ty), mask=mask)
    tl.store(dgu_ptr + gu_off + I, (dh * silu).to(dgu_ptr.dtype.element_ty), mask=mask)
    tl.store(h_ptr + h_off, (silu * up).to(h_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _grouped_wgrad_kernel(
    g_ptr, g_rows_ptr, a_ptr, a_rows_ptr, dw_ptr, experts_ptr, offsets_ptr, N, K,
    GATHER_G: tl.constexpr, GATHER_A: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """``dW[e, n, k] = sum_{r in rows(e)} G[g_row(r), n] A[a_row(r), k]``; one (expert, N block, K block)."""
    e = tl.load(experts_ptr + tl.program_id(0)).to(tl.int64)
    offs_n = tl.program_id(1) * BN + tl.arange(0, BN)
    offs_k = tl.program_id(2) * BK + tl.arange(0, BK)
    m_n = offs_n < N
    m_k = offs_k < K
    row_start = tl.load(offsets_ptr + e)
    row_end = tl.load(offsets_ptr + e + 1)

    acc = tl.zeros([BN, BK], dtype=tl.float32)
    for r0 in range(row_start, row_end, BM):
        rows = r0 + tl.arange(0, BM).to(tl.int64)
        m_row = rows < row_end
        if GATHER_G:
            g_rows = tl.load(g_rows_ptr + rows, mask=m_row, other=0).to(tl.int64)
        else:
            g_rows = rows
        if GATHER_A:
            a_rows = tl.load(a_rows_ptr + rows, mask=m_row, other=0).to(tl.int64)
        else:
            a_rows = rows
        g = tl.load(g_ptr + g_rows[:, None] * N + offs_n[None, :], mask=m_row[:, None] & m_n[None, :], other=0.0)
        a = tl.load(a_ptr + a_rows[:, None] * K + offs_k[None, :], mask=m_row[:, None] & m_k[None, :], other=0.0)
        acc += _dot(tl.trans(g), a, PRECISION, UPCAST)
    tl.store(dw_ptr + e * N * K + offs_n[:, None] * K + offs_k[None, :], acc.to(dw_ptr.dtype.element_ty),
             mask=m_n[:, None] & m_k[None, :])


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "") not in ("", "0")


def _blocks() -> tuple[int, int, int]:
    """(BM, BN, BK). Small under the interpreter (cost grows with the tile), GPU-sized otherwise; all >= 16."""
    return (16, 32, 32) if _interpreting() else (64, 64, 32)


def _dot_args(dtype: torch.dtype) -> dict:
    """``PRECISION``: full IEEE for fp32 (no tf32 rounding); 16-bit dots ignore it. ``UPCAST``: the interpreter
    (triton 3.9) returns garbage for ``tl.dot`` on bf16 operands (~1e10 errors), so there they are upcast to fp32."""
    return dict(PRECISION="ieee" if dtype == torch.float32 else "tf32",
                UPCAST=dtype == torch.bfloat16 and _interpreting())


def _block_schedule(counts: torch.Tensor, offsets: torch.Tensor, BM: int):
    """``(expert, row_start, row_end)`` int64 arrays: ``ceil(count / BM)`` row blocks per expert (none when empty)."""
    num_blocks = (counts + BM - 1) // BM
    total = int(num_blocks.sum())
    experts = torch.arange(counts.numel(), device=counts.device)
    blk_expert = torch.repeat_interleave(experts, num_blocks, output_size=total)
    first_block = torch.cumsum(num_blocks, 0) - num_blocks
    within = torch.arange(total, device=counts.device) - first_block[blk_expert]
    blk_start = offsets[blk_expert] + within * BM
    blk_end = offsets[blk_expert + 1]
    return blk_expert.contiguous(), blk_start.contiguous(), blk_end.contiguous()


def _grouped_gemm(a, a_rows, w, w_strides, y, y_rows, schedule, N, K, BM, BN, BK, dot_kw):
    blk_expert, blk_start, blk_end = schedule
    if blk_expert.numel() == 0 or N == 0:
        return
    _grouped_gemm_kernel[(blk_expert.numel(), triton.cdiv(N, BN))](
        a, a_rows if a_rows is not None else blk_start, w, y, y_rows if y_rows is not None else blk_start,
        blk_expert, blk_start, blk_end, N, K, *w_strides,
        GATHER_A=a_rows is not None, SCATTER_Y=y_rows is not None, BM=BM, BN=BN, BK=BK, **dot_kw,
    )


def _weight_grad(g, g_rows, a, a_rows, active, offsets, E, N, K, BM, BN, BK, dot_kw):
    """``[E, N, K]`` weight gradient; experts with no rows get exact zeros without launching a program."""
    dw = new_buffer(E, N, K, dtype=torch.float32, device=g.device)
    has_rows = torch.zeros(E, dtype=torch.bool, device=g.device)
    has_rows[active] = True
    dw[~has_rows] = 0.0
    if active.numel() > 0 and N > 0 and K > 0:
        _grouped_wgrad_kernel[(active.numel(), triton.cdiv(N, BN), triton.cdiv(K, BK))](
            g, g_rows if g_rows is not None else offsets, a, a_rows if a_rows is not None else offsets, dw,
            active, offsets, N, K, GATHER_G=g_rows is not None, GATHER_A=a_rows is not None,
            BM=BM, BN=BN, BK=BK, **dot_kw,
        )
    return dw


class _GroupedExpertMLPFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, gate_up, down, token_idx, expert_idx):
        H, (E, I2, _) = x.shape[1], gate_up.shape
        I, A, dev = I2 // 2, token_idx.shape[0], x.device
        x, gate_up, down = x.contiguous(), gate_up.contiguous(), down.contiguous()
        BM, BN, BK = _blocks()
        dot_kw = _dot_args(x.dtype)

        order, counts, offsets = sort_by_expert(expert_idx, E)
        src = token_idx.long()[order].contiguous()  # token read by each sorted row
        schedule = _block_schedule(counts, offsets, BM)
        needs_grad = any(ctx.needs_input_grad[:3])

        h = new_buffer(A, I, dtype=x.dtype, device=dev)
        gu = new_buffer(A, 2 * I, dtype=x.dtype, device=dev) if needs_grad else None
        if schedule[0].numel() > 0 and I > 0:
            _gate_up_swiglu_kernel[(schedule[0].numel(), triton.cdiv(I, BN))](
                x, src, gate_up, h, gu if gu is not None else h, *schedule, H, I,
                STORE_GU=gu is not None, BM=BM, BN=BN, BK=BK, **dot_kw,
            )
        y = new_buffer(A, H, dtype=x.dtype, device=dev)
        _grouped_gemm(h, None, down, (H * I, I, 1), y, order, schedule, H, I, BM, BN, BK, dot_kw)

        if needs_grad:
            ctx.save_for_backward(x, gate_up, down, gu, src, order, offsets, counts, *schedule)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, gate_up, down, gu, src, order, offsets, counts, *schedule = ctx.saved_tensors
        (N, H), (E, I2, _) = x.shape, gate_up.shape
        I, A, dev = I2 // 2, src.shape[0], x.device
        BM, BN, BK = _blocks()
        dot_kw = _dot_args(x.dtype)
        dy = dy.to(x.dtype).contiguous()

        # dh = dy[order] down[e]: down read as [E, I, H] through its strides.
        dh = new_buffer(A, I, dtype=torch.float32, device=dev)
        _grouped_gemm(dy, order, down, (H * I, 1, I), dh, None, schedule, I, H, BM, BN, BK, dot_kw)
        dgu = new_buffer(A, 2 * I, dtype=x.dtype, device=dev)
        h = new_buffer(A, I, dtype=x.dtype, device=dev)
        if A > 0 and I > 0:
            _swiglu_bwd_kernel[(triton.cdiv(A, BM), triton.cdiv(I, BN))](gu, dh, dgu, h, A, I, BM=BM, BN=BN)

        active = torch.nonzero(counts).flatten()
        d_down = d_gate_up = dx = None
        if ctx.needs_input_grad[2]:
            d_down = _weight_grad(dy, order, h, None, active, offsets, E, H, I, BM, BN, BK, dot_kw)
            d_down = d_down.to(down.dtype)
        if ctx.needs_input_grad[1]:
            d_gate_up = _weight_grad(dgu, None, x, src, active, offsets, E, 2 * I, H, BM, BN, BK, dot_kw)
            d_gate_up = d_gate_up.to(gate_up.dtype)
        if ctx.needs_input_grad[0]:
            # Per-assignment rows d[gate | up] gate_up[e] (gate_up read as [E, H, 2I]), summed into tokens.
            dx_rows = new_buffer(A, H, dtype=torch.float32, device=dev)
            _grouped_gemm(dgu, None, gate_up, (2 * I * H, 1, H), dx_rows, None, schedule, H, 2 * I, BM, BN, BK,
                          dot_kw)
            dx = torch.zeros(N, H, dtype=torch.float32, device=dev).index_add_(0, src, dx_rows).to(x.dtype)
        return dx, d_gate_up, d_down, None, None


def _check_inputs(x, token_idx, expert_idx, gate_up, down) -> None:
    if x.dim() != 2:
        raise ValueError(f"x must be [N, H], got shape {tuple(x.shape)}")
    H = x.shape[1]
    if gate_up.dim() != 3 or gate_up.shape[2] != H or gate_up.shape[1] % 2:
        raise ValueError(f"gate_up must be [E, 2I, {H}], got shape {tuple(gate_up.shape)}")
    E, I = gate_up.shape[0], gate_up.shape[1] // 2
    if tuple(down.shape) != (E, H, I):
        raise ValueError(f"down must be [{E}, {H}, {I}], got shape {tuple(down.shape)}")
    if token_idx.dim() != 1 or token_idx.shape != expert_idx.shape:
        raise ValueError(f"token_idx and expert_idx must be [A], got {tuple(token_idx.shape)}, "
                         f"{tuple(expert_idx.shape)}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"x dtype {x.dtype} is not supported by the Triton path (fp32, fp16, bf16)")


def triton_grouped_expert_mlp(
    x: torch.Tensor,
    token_idx: torch.LongTensor,
    expert_idx: torch.LongTensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
) -> torch.Tensor:
    """Grouped expert SwiGLU MLP with Triton forward and backward kernels. Same contract as ``naive_expert_mlp``.

    x ``[N, H]`` (fp32 / fp16 / bf16); token_idx, expert_idx ``[A]``; gate_up ``[E, 2I, H]``; down ``[E, H, I]``
    (cast to x's dtype). Returns ``[A, H]`` in assignment order, in x's dtype; differentiable in x, gate_up and down.
    """
    _check_inputs(x, token_idx, expert_idx, gate_up, down)
    token_idx = token_idx.to(device=x.device, dtype=torch.long)
    expert_idx = expert_idx.to(device=x.device, dtype=torch.long)
    return _GroupedExpertMLPFunction.apply(x, gate_up.to(x.dtype), down.to(x.dtype), token_idx, expert_idx)


def triton_weighted_expert_mlp(
    x: torch.Tensor,
    token_idx: torch.LongTensor,
    expert_idx: torch.LongTensor,
    weight: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
) -> torch.Tensor:
    """``[N, H]`` routing-weighted sum of expert outputs (contract of ``weighted_expert_mlp``): the Triton grouped
    MLP per assignment, then the weighting and the scatter to tokens in torch (autograd gives the weight gradient)."""
    y = triton_grouped_expert_mlp(x, token_idx, expert_idx, gate_up, down)
    return torch.zeros_like(x).index_add_(0, token_idx.to(x.device), y * weight[:, None].to(y.dtype))
