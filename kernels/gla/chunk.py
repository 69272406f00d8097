"""Gated Linear Attention, chunkwise-parallel PyTorch form: the CPU path (backward by plain autograd).

Same contract as :func:`naive_recurrent_gla`, plus ``chunk_size``. Per chunk of C steps, with b = cumsum(g) inside
the chunk (fp32, b <= 0 and non-increasing)::

    o_i   = scale * [ (q_i * exp(b_i)) S_prev  +  sum_{j<=i} <q_i, k_j * exp(b_i - b_j)> v_j ]
    S_new = Diag(exp(b_C)) S_prev + sum_j (k_j * exp(b_C - b_j))^T v_j

Numerics: every exponential evaluated here has a non-positive argument that is a sum of g over the steps it spans
(prefix sums, suffix sums, sums inside a block), so nothing overflows however strong the gates are and a gate spike
costs no precision elsewhere in the chunk. The intra-chunk scores ``sum_d q_id k_jd exp(b_id - b_jd)`` differ in decay
per key channel, so they come from :func:`..decay_pairs.decayed_pairs` (exact halving: one matmul per block and level,
no ``[C, C, D_k]`` tensor), with chunks padded to a power of two by inert steps (q = k = v = 0, g = 0). The
inter-chunk part is vectorised over a group of chunks (sized to stay in cache, :mod:`..chunk_groups`) except a
short scan of state updates (the per-chunk tensors are unbound once before that loop). Packed sequences (``cu_seqlens``) are processed one after another.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..chunk_groups import chunk_group_size, scan_chunk_groups
from ..decay_pairs import decayed_pairs, prefix_sum, suffix_sum
from ._checks import check_gla_inputs, compute_dtype, run_per_sequence

__all__ = ["chunk_gla"]

def _gla_chunk_group(q, k, v, g, S):
    """One group of chunks ``[B, H, G, P2, *]`` from entering state ``S [B, H, Dk, Dv]``: (output, state after)."""
    b = prefix_sum(g)  # in-chunk cumulative log decay, <= 0
    b_tail = suffix_sum(g)  # b_last - b, summed directly

    A = decayed_pairs([q], k, g)[0]  # [B, H, G, P2, P2], causal incl. the diagonal
    k_decayed_t = (k * b_tail.exp()).transpose(-1, -2)  # [B, H, G, Dk, P2]
    dS = k_decayed_t @ v  # per-chunk state increments, [B, H, G, Dk, Dv]
    chunk_decay = b[..., -1:, :].transpose(-1, -2).exp()  # [B, H, G, Dk, 1]
    states = []
    for dS_n, a_n in zip(dS.unbind(2), chunk_decay.unbind(2)):
        states.append(S)
        S = torch.addcmul(dS_n, a_n, S)
    return A @ v + (q * b.exp()) @ torch.stack(states, 2), S


def _gla_chunk_core(q, k, v, g, h0, chunk_size):
    # q, k, g: [B, T, H, Dk] (q already scaled), v: [B, T, H, Dv], all in the compute dtype; h0: [B, H, Dk, Dv] | None
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    C = min(chunk_size, T)  # steps per chunk (short inputs such as decode need no full-size chunk)
    NC = -(-T // C)
    P2 = 1 << (C - 1).bit_length()  # each chunk padded to a power of two for the halving in decayed_pairs

    def chunked(x):  # [B, T, H, D] -> [B, H, NC, P2, D]; padding steps (q = k = v = 0, g = 0) are inert
        x = F.pad(x.transpose(1, 2), (0, 0, 0, NC * C - T)).reshape(B, H, NC, C, x.shape[-1])
        return F.pad(x, (0, 0, 0, P2 - C)) if P2 > C else x

    q, k, v, g = chunked(q), chunked(k), chunked(v), chunked(g)
    S = h0 if h0 is not None else q.new_zeros(B, H, Dk, Dv)
    group = chunk_group_size(NC, B * H * P2 * max(P2, Dk, Dv) * q.element_size(), q.device)
    o, S = scan_chunk_groups(_gla_chunk_group, (q, k, v, g), S, dim=2, group=group)

    o = o[..., :C, :].reshape(B, H, NC * C, Dv)[:, :, :T].transpose(1, 2)
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
