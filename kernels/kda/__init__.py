"""Kimi Delta Attention (KDA, Kimi Linear) ops, fla conventions: naive reference, chunked CPU path, per-step decode
path, and the public op :func:`kda` choosing PyTorch or Triton per call (see :mod:`..dispatch`).

KDA is the gated delta rule with a per-channel decay ``g [B, T, H, K]``::

    S_t = (I - beta_t k_t k_t^T) Diag(exp(g_t)) S_{t-1} + beta_t k_t v_t^T,      o_t = scale * S_t^T q_t
"""

from __future__ import annotations

from typing import Optional

import torch

from ..dispatch import select_backend
from ..fla_backend import fla_op
from ..ops import RECURRENT_MAX_TOKENS, _triton_op, run_delta_rule
from .chunk import chunk_kda
from .naive import naive_recurrent_kda
from .recurrent import fused_recurrent_kda

__all__ = ["chunk_kda", "fused_recurrent_kda", "kda", "naive_recurrent_kda"]


def _torch_kda(q, k, v, g, beta, **kwargs):
    fn = fused_recurrent_kda if q.shape[1] <= RECURRENT_MAX_TOKENS else chunk_kda
    return fn(q, k, v, g, beta, **kwargs)


# _triton_op resolves the module relative to ops' package; the Triton module is imported only when
# chosen, so this works where triton is missing or has no GPU driver.
_KDA_IMPLS = {"torch": _torch_kda, **_triton_op(".kda.triton_kda", "triton_kda"), **fla_op("kda", RECURRENT_MAX_TOKENS)}


def kda(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: Optional[float] = None,
    initial_state: Optional[torch.Tensor] = None,
    output_final_state: bool = False,
    cu_seqlens: Optional[torch.LongTensor] = None,
    use_qk_l2norm: bool = False,
    backend: Optional[str] = None,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Kimi Delta Attention ``S_t = S' + β_t k_t (v_t - S'ᵀ k_t)ᵀ`` with ``S' = Diag(exp(g_t)) S_{t-1}``,
    ``o_t = scale · S_tᵀ q_t`` (``scale`` defaults to ``K ** -0.5``).

    q, k, g ``[B, T, H, K]`` (g the per-channel log decay, <= 0, fp32 recommended); v ``[B, T, H, V]``; beta
    ``[B, T, H]``; initial_state ``[N, H, K, V]``; cu_seqlens ``[N + 1]`` with B == 1 packs N sequences.
    Returns ``(o [B, T, H, V] in q's dtype, final_state [N, H, K, V] fp32 or None)``. On the PyTorch backend
    T <= ``RECURRENT_MAX_TOKENS`` runs the per-token path, longer inputs the chunked one.
    """
    impl = select_backend("kda", _KDA_IMPLS, q, backend)
    return run_delta_rule("kda", impl, q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens,
                          use_qk_l2norm)
