"""The public ops: one function per op, choosing the implementation per call (see :mod:`.dispatch`).

Each op has a PyTorch implementation (the CPU path, and the fallback anywhere) and a Triton one (forward and
backward, used by default on CUDA tensors). The Triton modules are imported only when chosen, so these functions
work where triton is missing or has no GPU driver.
"""

from __future__ import annotations

import importlib
from typing import Callable, Optional

import torch

from .delta_rule import chunk_gated_delta_rule as _torch_chunk_gdr
from .delta_rule import fused_recurrent_gated_delta_rule as _torch_recurrent_gdr
from .dispatch import select_backend
from .gla import chunk_gla as _torch_chunk_gla
from .gla import fused_recurrent_gla as _torch_recurrent_gla
from .sliding_window import chunk_sliding_window_attention as _torch_swa

__all__ = ["gla", "gated_delta_rule", "sliding_window_attention", "RECURRENT_MAX_TOKENS"]

# At or below this many new tokens (decoding, short continuations) the recurrent form beats the chunked one on CPU.
RECURRENT_MAX_TOKENS = 8


def _lazy(module: str, name: str) -> Callable:
    def load(*args, **kwargs):
        return getattr(importlib.import_module(module, __package__), name)(*args, **kwargs)

    load.__name__ = name
    return load


_TRITON_GLA = _lazy(".gla.triton_gla", "triton_gla")
_TRITON_GDR = _lazy(".delta_rule.triton_delta_rule", "triton_gated_delta_rule")
_TRITON_SWA = _lazy(".sliding_window.triton_sliding_window", "triton_sliding_window_attention")


def _torch_gla(q, k, v, g, **kwargs):
    fn = _torch_recurrent_gla if q.shape[1] <= RECURRENT_MAX_TOKENS else _torch_chunk_gla
    return fn(q, k, v, g, **kwargs)


def _torch_gdr(q, k, v, g, beta, **kwargs):
    fn = _torch_recurrent_gdr if q.shape[1] <= RECURRENT_MAX_TOKENS else _torch_chunk_gdr
    return fn(q, k, v, g, beta, **kwargs)


def gla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    scale: Optional[float] = None,
    initial_state: Optional[torch.Tensor] = None,
    output_final_state: bool = False,
    cu_seqlens: Optional[torch.LongTensor] = None,
    backend: Optional[str] = None,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Gated linear attention ``S_t = Diag(exp(g_t)) S_{t-1} + k_tᵀ v_t``, ``o_t = scale · q_t S_t``.

    q, k, g ``[B, T, H, K]``; v ``[B, T, H, V]``; initial_state ``[N, H, K, V]``. Returns ``(o, final_state)``.
    """
    impl = select_backend("gla", {"torch": _torch_gla, "triton": _TRITON_GLA}, q, backend)
    return impl(q, k, v, g, scale=scale, initial_state=initial_state, output_final_state=output_final_state,
                cu_seqlens=cu_seqlens)


def gated_delta_rule(
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
    """Gated delta rule ``S_t = exp(g_t) S_{t-1} + β_t k_t (v_t - (exp(g_t) S_{t-1})ᵀ k_t)ᵀ``, ``o_t = scale · S_tᵀ q_t``.

    q, k ``[B, T, H, K]``; v ``[B, T, HV, V]``; g, beta ``[B, T, HV]``; initial_state ``[N, HV, K, V]``.
    """
    impl = select_backend("gated_delta_rule", {"torch": _torch_gdr, "triton": _TRITON_GDR}, q, backend)
    return impl(q, k, v, g, beta, scale=scale, initial_state=initial_state, output_final_state=output_final_state,
                cu_seqlens=cu_seqlens, use_qk_l2norm=use_qk_l2norm)


def sliding_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int,
    sink_logits: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    cu_seqlens: Optional[torch.LongTensor] = None,
    attention_mask: Optional[torch.Tensor] = None,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Causal sliding-window softmax attention with optional sink logits ``[H, S]`` in the denominator.

    q ``[B, T, H, D]``, k/v ``[B, T, H_kv, D]``; attention_mask ``[B, T]`` marks real tokens.
    """
    impl = select_backend("sliding_window_attention", {"torch": _torch_swa, "triton": _TRITON_SWA}, q, backend)
    return impl(q, k, v, window, sink_logits=sink_logits, scale=scale, cu_seqlens=cu_seqlens,
                attention_mask=attention_mask)
