"""Gated Linear Attention, chunkwise-parallel PyTorch form: the CPU path (backward by plain autograd).

Same contract as :func:`naive_recurrent_gla`, plus ``chunk_size``. Per chunk of C steps, with b = cumsum(g) inside
the chunk (fp32, b <= 0 and non-increasing)::

    o_i   = scale * [ (q_i * exp(b_i)) S_prev  +  sum_{j<=i} <q_i, k_j * exp(b_i - b_j)> v_j ]
    S_new = Diag(exp(b_C)) S_prev + sum_j (k_j * exp(b_C - b_j))^T v_j

Numerics: every exponential evaluated here has a non-positive argument, so nothing overflows however strong the
gates are (underflow to 0 is then the correct limit). exp(-b) is never formed. The intra-chunk term uses secondary
chunking (as in the GLA paper): the chunk is cut into sub-chunks of ``c = 16`` steps;
  * diagonal sub-chunk blocks use the exact pairwise decay exp(bl_i - bl_j), j <= i, with bl the cumsum *inside*
    the sub-chunk ([c, c, D_k] per sub-chunk, masked before exp);
  * an off-diagonal block (query sub-chunk I after key sub-chunk J) factorises through the start of sub-chunk I:
    exp(b_i - b_j) = exp(b_i - r_I) * exp(r_I - b_j), both factors <= 1, then one matmul.
The inter-chunk part is vectorised over all chunks except a short scan of NC = T / C state updates (the per-chunk
tensors are unbound once before that loop). Packed sequences (``cu_seqlens``) are processed one after another.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ._checks import check_gla_inputs, compute_dtype, run_per_sequence

__all__ = ["chunk_gla"]

_GLA_SUB_CHUNK = 16  # secondary chunk size


def _gla_chunk_core(q, k, v, g, h0, chunk_size):
    # q, k, g: [B, T, H, Dk] (q already scaled), v: [B, T, H, Dv], all in the compute dtype; h0: [B, H, Dk, Dv] | None
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    C = chunk_size
    c = _GLA_SUB_CHUNK if C % _GLA_SUB_CHUNK == 0 else C
    C = min(C, -(-T // c) * c)  # short inputs (decode, T=1) need no full-size chunk
    n = C // c
    NC = -(-T // C)
    pad = NC * C - T

    def to_chunks(x):  # [B, T, H, D] -> [B, H, NC, C, D]; zero padding at the end is inert (k = 0, g = 0)
        x = x.transpose(1, 2)
        if pad:
            x = F.pad(x, (0, 0, 0, pad))
        return x.reshape(B, H, NC, C, x.shape[-1])

    q, k, v, g = to_chunks(q), to_chunks(k), to_chunks(v), to_chunks(g)

    # Cumulative log-gates: bl inside each sub-chunk, offsets of the sub-chunks inside the chunk, b inside the chunk.
    bl = g.reshape(B, H, NC, n, c, Dk).cumsum(-2)  # [B, H, NC, n, c, Dk]
    tot = bl[..., -1, :]  # [B, H, NC, n, Dk]
    off = tot.cumsum(-2) - tot  # exclusive: b just before each sub-chunk
    b = (bl + off.unsqueeze(-2)).reshape(B, H, NC, C, Dk)

    qs = q.reshape(B, H, NC, n, c, Dk)
    ks = k.reshape(B, H, NC, n, c, Dk)

    # Diagonal sub-chunk blocks: exact pairwise decays, masked (j > i) before the exponential.
    causal = torch.ones(c, c, dtype=torch.bool, device=q.device).tril()
    diff = bl.unsqueeze(-2) - bl.unsqueeze(-3)  # [.., c(i), c(j), Dk]: bl_i - bl_j
    decay = torch.where(causal[:, :, None], diff, diff.new_tensor(float("-inf"))).exp()
    A = (qs.unsqueeze(-2) * ks.unsqueeze(-3) * decay).sum(-1)  # [B, H, NC, n, c, c]

    if n > 1:
        # Off-diagonal blocks J < I through the reference point r_I = off_I (b just before sub-chunk I).
        strict = torch.ones(n, n, dtype=torch.bool, device=q.device).tril(-1)  # [I, J]: J < I
        rel = off.unsqueeze(-2) - off.unsqueeze(-3)  # [.., n(I), n(J), Dk]: r_I - off_J
        rel = torch.where(strict[:, :, None], rel, rel.new_tensor(float("-inf")))
        k_off = ks.unsqueeze(3) * (rel.unsqueeze(-2) - bl.unsqueeze(3)).exp()  # [.., I, J, c, Dk], factor <= 1
        q_off = qs * bl.exp()  # exp(b_i - r_I) = exp(bl_i) <= 1
        A_off = q_off.unsqueeze(4) @ k_off.transpose(-1, -2)  # [.., I, J, c, c], zero where J >= I
        eye = torch.eye(n, dtype=A.dtype, device=A.device)[:, :, None, None]
        A = A_off + eye * A.unsqueeze(4)  # put the diagonal blocks on I == J
        A = A.transpose(-3, -2).reshape(B, H, NC, C, C)
    else:
        A = A.reshape(B, H, NC, C, C)
    o = A @ v  # intra-chunk, [B, H, NC, C, Dv]

    # Inter-chunk: per-chunk state increments in parallel, then a short scan over chunks.
    b_last = b[..., -1:, :]  # [B, H, NC, 1, Dk]
    dS = (k * (b_last - b).exp()).transpose(-1, -2) @ v  # [B, H, NC, Dk, Dv]
    chunk_decay = b_last.transpose(-1, -2).exp()  # [B, H, NC, Dk, 1]
    S = h0 if h0 is not None else q.new_zeros(B, H, Dk, Dv)
    states = []
    for dS_n, a_n in zip(dS.unbind(2), chunk_decay.unbind(2)):
        states.append(S)
        S = torch.addcmul(dS_n, a_n, S)
    o = o + (q * b.exp()) @ torch.stack(states, 2)

    o = o.reshape(B, H, NC * C, Dv)[:, :, :T].transpose(1, 2)
    return o, S


def chunk_gla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    scale: Optional[float] = None,
    initial_state: Optional[torch.Tensor] = None,
    output_final_state: bool = False,
    cu_seqlens: Optional[torch.LongTensor] = None,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Chunked GLA; returns ``(o [B, T, H, D_v] in q's dtype, final_state [N, H, D_k, D_v] fp32 or None)``."""
    lengths = check_gla_inputs(q, k, v, g, initial_state, cu_seqlens)
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if scale is None:
        scale = q.shape[-1] ** -0.5
    out_dtype = q.dtype
    dt = compute_dtype(q, k, v, g, initial_state)
    q = q.to(dt) * scale
    k, v, g = k.to(dt), v.to(dt), g.to(dt)
    h0 = initial_state.to(dt) if initial_state is not None else None

    def core(q, k, v, g, h0):
        return _gla_chunk_core(q, k, v, g, h0, chunk_size)

    o, S = run_per_sequence(core, q, k, v, g, h0, cu_seqlens, lengths)
    return o.to(out_dtype), (S if output_final_state else None)
