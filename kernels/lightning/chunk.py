"""Lightning attention, chunked (Lightning Attention-2's split): within a block of C tokens the quadratic masked
form, across blocks the state. With ``b_i = i·log λ`` inside the block and the state ``S`` before it::

    o_i    = scale · [ Σ_{j<=i} (q_i·k_j) λ^{i-j} v_j   +   λ^{i+1} q_i S ]          intra-block + inter-block
    S_next = λ^C S + Σ_j λ^{C-1-j} k_jᵀ v_j

Every exponent is <= 0. Blocks are vectorised a cache-sized group at a time (``..chunk_groups``), the state carried
through a short loop; backward by autograd.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..chunk_groups import chunk_group_size, scan_chunk_groups
from ._checks import check_lightning_inputs, prepare_lightning_inputs, run_lightning_sequences

__all__ = ["chunk_lightning_attention", "lightning_log_decay"]


def lightning_log_decay(num_heads: int, layer_idx: int, num_layers: int, base: float = 8.0,
                        device=None) -> torch.Tensor:
    """TransNormerLLM's fixed decays: ``log λ_h = -(base·h/H)·(1 - l/L)`` for head h of layer l (fp32, ``[H]``):
    head 0 never forgets, deeper layers forget less."""
    rate = (base / num_heads) * (1 - layer_idx / num_layers)
    return torch.tensor([-rate * h for h in range(num_heads)], dtype=torch.float32, device=device or "cpu")


def _lightning_chunk_group(q, k, v, g, S, causal):
    # q, k, v: [BH, G, C, *]; g: [BH, G, C] (the head's log decay on every token); S: [BH, K, V]
    b = g.cumsum(dim=-1)  # b_i = (i + 1) log λ
    rel = (b.unsqueeze(-1) - b.unsqueeze(-2)).masked_fill(~causal, float("-inf")).exp()  # λ^(i-j), j <= i
    intra = ((q @ k.transpose(-1, -2)) * rel) @ v
    q_decayed = q * b.exp().unsqueeze(-1)
    tail = (b[..., -1:] - b).exp().unsqueeze(-1)  # λ^(C-1-j)
    increments = (k * tail).transpose(-1, -2) @ v  # [BH, G, K, V]
    block_decay = b[..., -1].exp()[..., None, None]  # λ^C
    states = []
    for inc, decay in zip(increments.unbind(1), block_decay.unbind(1)):
        states.append(S)
        S = torch.addcmul(inc, decay, S)
    return intra + q_decayed @ torch.stack(states, dim=1), S


def _chunk_lightning_core(q, k, v, g, h0, chunk_size):
    B, T, H, K = q.shape
    V = v.shape[-1]
    BH, C = B * H, min(chunk_size, T)
    pad = (-T) % C
    NC = (T + pad) // C

    def chunked(x):  # [B, T, H, *] -> [BH, NC, C, *]; padded tokens have q = k = v = 0 and no decay
        x = x.transpose(1, 2)
        x = F.pad(x, (0, 0, 0, pad)) if x.dim() == 4 else F.pad(x, (0, pad))
        return x.reshape(BH, NC, C, *x.shape[3:])

    q, k, v, g = chunked(q), chunked(k), chunked(v), chunked(g)
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    S = q.new_zeros(BH, K, V) if h0 is None else h0.reshape(BH, K, V)
    group = chunk_group_size(NC, BH * C * max(C, K, V) * q.element_size(), q.device)
    o, S = scan_chunk_groups(lambda q, k, v, g, S: _lightning_chunk_group(q, k, v, g, S, causal), (q, k, v, g), S, dim=1,
                             group=group)
    return o.reshape(B, H, NC * C, V)[:, :, :T].transpose(1, 2), S.reshape(B, H, K, V)


def chunk_lightning_attention(q, k, v, log_decay, scale=None, initial_state=None, output_final_state=False,
                              cu_seqlens=None, chunk_size: int = 64):
    """Same contract as :func:`naive_lightning_attention`, plus ``chunk_size``."""
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    lengths = check_lightning_inputs(q, k, v, log_decay, initial_state, cu_seqlens)
    dtype = q.dtype
    q, k, v, g, h0 = prepare_lightning_inputs(q, k, v, log_decay, initial_state, scale)
    o, S = run_lightning_sequences(lambda q, k, v, g, h0: _chunk_lightning_core(q, k, v, g, h0, chunk_size), q, k, v, g, h0, lengths,
                         cu_seqlens is not None)
    return o.to(dtype), (S if output_final_state else None)
