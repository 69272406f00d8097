"""Per-token Kimi Delta Attention for decoding (T small, e.g. T = 1 with the cached state): four batched ops per step,
inputs unbound once before the loop. Same contract as :func:`naive_recurrent_kda`."""

from __future__ import annotations

import torch

from ..delta_rule.recurrent import delta_rule_recurrent_core  # the same steps, with a per-channel decay
from ._checks import check_kda_inputs, prepare_kda_inputs, run_kda_sequences

__all__ = ["fused_recurrent_kda"]


def fused_recurrent_kda(
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
    """KDA token by token (decode path). Same contract as ``naive_recurrent_kda``.

    q, k, g ``[B, T, H, K]``; v ``[B, T, H, V]``; beta ``[B, T, H]``; initial_state ``[N, H, K, V]``.
    Returns ``(o [B, T, H, V] in q's dtype, final_state [N, H, K, V] fp32 (fp64) or None)``.
    """
    check_kda_inputs(q, k, v, g, beta, scale, initial_state, cu_seqlens)
    dtype = q.dtype
    q, k, v, g, beta, h0, scale = prepare_kda_inputs(q, k, v, g, beta, initial_state, scale, use_qk_l2norm)
    o, ht = run_kda_sequences(delta_rule_recurrent_core, q, k, v, g, beta, h0, cu_seqlens, scale=scale)
    return o.to(dtype), (ht if output_final_state else None)
