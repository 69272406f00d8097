"""The public ops: one function per op, choosing the implementation per call (see :mod:`.dispatch`).

Each op has a PyTorch implementation (the CPU path, and the fallback anywhere) and a Triton one (forward and
backward, used by default on CUDA tensors); GLA, the gated delta rule and KDA also run on fla's kernels where fla is
installed, the CUDA default then (see :mod:`.fla_backend`). The Triton modules are imported only when chosen, so these functions
work where triton is missing or has no GPU driver.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
from typing import Callable, Optional

import torch

from .block_sparse.chunk import chunk_block_sparse_attention
from .block_sparse.pooled_scores import chunk_pooled_attention_scores
from .delta_rule.chunk import chunk_gated_delta_rule
from .delta_rule.recurrent import fused_recurrent_gated_delta_rule
from .dispatch import select_backend
from .fla_backend import fla_op
from .gla.chunk import chunk_gla
from .gla.recurrent import fused_recurrent_gla
from .krr.chunk import krr_attention_torch
from .lasp2 import active_plan, lasp2_affine, lasp2_diagonal, refuse_unsupported
from .lightning._checks import decay_as_gla_gate
from .lightning.chunk import chunk_lightning_attention
from .lightning.recurrent import fused_recurrent_lightning_attention
from .moe.grouped import grouped_expert_mlp
from .moe.traceable import traceable_weighted_expert_mlp
from .moe.weighted import grouped_weighted_expert_mlp
from .sa_softmax.cached import sa_softmax_attention_over_cache
from .sa_softmax.chunk import chunk_sa_softmax_attention
from .sliding_window.chunk import chunk_sliding_window_attention

__all__ = ["gla", "gated_delta_rule", "lightning_attention", "sliding_window_attention", "sliding_window_attention_with_mass",
           "block_sparse_attention", "pooled_attention_scores",
           "sa_softmax_attention", "krr_attention",
           "expert_mlp", "weighted_expert_mlp", "RECURRENT_MAX_TOKENS"]

# At or below this many new tokens (decoding, short continuations) the recurrent form beats the chunked one on CPU.
RECURRENT_MAX_TOKENS = 8


def _triton_op(module: str, name: str) -> dict[str, Callable]:
    """``{"triton": op}`` when triton and our Triton module are importable (not in exported remote code), else {}."""
    try:
        found = importlib.util.find_spec("triton") is not None and importlib.util.find_spec(module, __package__) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        return {}

    def load(*args, **kwargs):
        return getattr(importlib.import_module(module, __package__), name)(*args, **kwargs)

    load.__name__ = name
    return {"triton": load}


def _torch_gla(q, k, v, g, **kwargs):
    fn = fused_recurrent_gla if q.shape[1] <= RECURRENT_MAX_TOKENS else chunk_gla
    return fn(q, k, v, g, **kwargs)


def _torch_gdr(q, k, v, g, beta, **kwargs):
    fn = fused_recurrent_gated_delta_rule if q.shape[1] <= RECURRENT_MAX_TOKENS else chunk_gated_delta_rule
    return fn(q, k, v, g, beta, **kwargs)


def _torch_lightning(q, k, v, log_decay, **kwargs):
    fn = fused_recurrent_lightning_attention if q.shape[1] <= RECURRENT_MAX_TOKENS else chunk_lightning_attention
    return fn(q, k, v, log_decay, **kwargs)


_LIGHTNING_IMPLS = {"torch": _torch_lightning, **_triton_op(".lightning.triton_lightning", "triton_lightning_attention"),
                    **fla_op("lightning", RECURRENT_MAX_TOKENS)}
_GLA_IMPLS = {"torch": _torch_gla, **_triton_op(".gla.triton_gla", "triton_gla"), **fla_op("gla", RECURRENT_MAX_TOKENS)}
_GDR_IMPLS = {
    "torch": _torch_gdr,
    **_triton_op(".delta_rule.triton_delta_rule", "triton_gated_delta_rule"),
    **fla_op("gated_delta_rule", RECURRENT_MAX_TOKENS),
}
_SWA_IMPLS = {
    "torch": chunk_sliding_window_attention,
    **_triton_op(".sliding_window.triton_sliding_window", "triton_sliding_window_attention"),
}
# With each row's softmax mass (LoLCATs' shared denominator): the PyTorch path only, on every device, for now.
_SWA_MASS_IMPLS = {"torch": functools.partial(chunk_sliding_window_attention, return_mass=True)}
_BSA_IMPLS = {
    "torch": chunk_block_sparse_attention,
    **_triton_op(".block_sparse.triton_block_sparse", "triton_block_sparse_attention"),
}
_SA_IMPLS = {
    "torch": chunk_sa_softmax_attention,
    **_triton_op(".sa_softmax.triton_sa_softmax", "triton_sa_softmax_attention"),
}
_MOE_IMPLS = {"torch": grouped_expert_mlp, **_triton_op(".moe.triton_moe", "triton_grouped_expert_mlp")}
_WEIGHTED_MOE_IMPLS = {
    "torch": grouped_weighted_expert_mlp,
    **_triton_op(".moe.triton_moe", "triton_weighted_expert_mlp"),
}


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
    impl = select_backend("gla", _GLA_IMPLS, q, backend)
    plan = active_plan()
    if plan is not None:  # LASP-2: this rank holds one chunk of the sequence
        refuse_unsupported("gla", cu_seqlens)
        return lasp2_diagonal(lambda q_, k_, v_, **state: impl(q_, k_, v_, g, scale=scale, **state), q, k, v, g,
                              scale=q.shape[-1] ** -0.5 if scale is None else scale, plan=plan,
                              initial_state=initial_state, output_final_state=output_final_state)
    return impl(q, k, v, g, scale=scale, initial_state=initial_state, output_final_state=output_final_state,
                cu_seqlens=cu_seqlens)


def lightning_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor,
    scale: Optional[float] = None,
    initial_state: Optional[torch.Tensor] = None,
    output_final_state: bool = False,
    cu_seqlens: Optional[torch.LongTensor] = None,
    backend: Optional[str] = None,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Lightning attention (TransNormerLLM) ``S_t = λ_h S_{t-1} + k_tᵀ v_t``, ``o_t = scale · q_t S_t`` with a fixed
    decay per head, ``log_decay [H]`` (<= 0). q, k ``[B, T, H, K]``; v ``[B, T, H, V]``; initial_state
    ``[N, H, K, V]``. Returns ``(o, final_state)``."""
    impl = select_backend("lightning_attention", _LIGHTNING_IMPLS, q, backend)
    plan = active_plan()
    if plan is not None:  # LASP-2: this rank holds one chunk of the sequence
        refuse_unsupported("lightning_attention", cu_seqlens)
        return lasp2_diagonal(lambda q_, k_, v_, **state: impl(q_, k_, v_, log_decay, scale=scale, **state),
                              q, k, v, decay_as_gla_gate(log_decay, q),
                              scale=q.shape[-1] ** -0.5 if scale is None else scale, plan=plan,
                              initial_state=initial_state, output_final_state=output_final_state)
    return impl(q, k, v, log_decay, scale=scale, initial_state=initial_state, output_final_state=output_final_state,
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
    impl = select_backend("gated_delta_rule", _GDR_IMPLS, q, backend)
    return run_delta_rule("gated_delta_rule", impl, q, k, v, g, beta, scale, initial_state, output_final_state,
                          cu_seqlens, use_qk_l2norm)


def run_delta_rule(name: str, impl: Callable, q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens,
                   use_qk_l2norm):
    """Call a delta-rule implementation (gated delta rule, KDA), across ranks inside a LASP-2 plan."""
    plan = active_plan()
    if plan is not None:  # LASP-2: this rank holds one chunk of the sequence
        refuse_unsupported(name, cu_seqlens)
        return lasp2_affine(lambda q_, k_, v_, **state: impl(q_, k_, v_, g, beta, scale=scale,
                                                             use_qk_l2norm=use_qk_l2norm, **state),
                            q, k, v, plan=plan, initial_state=initial_state, output_final_state=output_final_state)
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
    impl = select_backend("sliding_window_attention", _SWA_IMPLS, q, backend)
    return impl(q, k, v, window, sink_logits=sink_logits, scale=scale, cu_seqlens=cu_seqlens,
                attention_mask=attention_mask)


def sliding_window_attention_with_mass(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int,
    scale: Optional[float] = None,
    cu_seqlens: Optional[torch.LongTensor] = None,
    attention_mask: Optional[torch.Tensor] = None,
    backend: Optional[str] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`sliding_window_attention` (no sinks) and each query row's ``Σ exp(score - row max)`` ``[B, T, H]`` in
    fp32, the row max differentiable: what a hybrid needs to share one denominator with other terms (LoLCATs)."""
    impl = select_backend("sliding_window_attention_with_mass", _SWA_MASS_IMPLS, q, backend)
    return impl(q, k, v, window, scale=scale, cu_seqlens=cu_seqlens, attention_mask=attention_mask)


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: torch.Tensor,
    block_size: int,
    *,
    scale: Optional[float] = None,
    attention_mask: Optional[torch.Tensor] = None,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Causal softmax attention restricted to the key blocks a gate selected (SeerAttention-style).

    q ``[B, T, H, D]``, k/v ``[B, T, H_kv, D]``; block_mask bool ``[B, H, N, N]`` with ``N = ceil(T / block_size)``:
    query block ``i`` attends key block ``j`` where it is True and ``j <= i`` (causal inside); attention_mask
    ``[B, T]`` marks real tokens. A query row with no attendable key outputs 0.
    """
    impl = select_backend("block_sparse_attention", _BSA_IMPLS, q, backend)
    return impl(q, k, v, block_mask, block_size, scale=scale, attention_mask=attention_mask)


def pooled_attention_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    block_size: int,
    *,
    scale: Optional[float] = None,
    attention_mask: Optional[torch.Tensor] = None,
    pool: str = "max",
) -> torch.Tensor:
    """Dense causal attention probabilities pooled per (query block, key block) tile, ``[B, H, N, N]`` fp32.

    The gate's distillation target: ``pool`` "max" or "mean" over each tile, non-causal tiles zeroed, each row
    renormalised over key blocks (rows with nothing stay 0). PyTorch only (chunked, no ``[T, T]`` map), no gradient.
    """
    return chunk_pooled_attention_scores(q, k, block_size, scale=scale, attention_mask=attention_mask, pool=pool)


def sa_softmax_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    mode: str = "plain",
    scale: Optional[float] = None,
    attention_mask: Optional[torch.Tensor] = None,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Causal attention with Self-Adjust Softmax weights: ``x·softmax(x)`` (``mode="plain"``) or
    ``(x − min(x_min,0)) / (max(0,x_max) − min(x_min,0)) · softmax(x)`` (``"normalized"``).

    q ``[B, T_q, H, D]``, k/v ``[B, S, H_kv, D]``; ``T_q = S`` runs the fused kernels (Triton on CUDA, chunked
    PyTorch elsewhere); ``T_q < S`` (decode: the newest queries over a cache) runs a small PyTorch path.
    attention_mask ``[B, S]`` marks real tokens.
    """
    if q.shape[1] != k.shape[1]:
        return sa_softmax_attention_over_cache(q, k, v, mode=mode, scale=scale, attention_mask=attention_mask)
    impl = select_backend("sa_softmax_attention", _SA_IMPLS, q, backend)
    return impl(q, k, v, mode=mode, scale=scale, attention_mask=attention_mask)


def expert_mlp(
    x: torch.Tensor,
    token_idx: torch.LongTensor,
    expert_idx: torch.LongTensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Grouped expert SwiGLU MLP over routed assignments: ``y[a] = down[e] (silu(gate) * up)``, ``e = expert_idx[a]``.

    x ``[N, H]``; token_idx, expert_idx ``[A]``; gate_up ``[E, 2I, H]`` (gate rows, then up rows); down ``[E, H, I]``.
    Returns ``[A, H]`` in assignment order (the caller applies routing weights and scatters into tokens).
    """
    impl = select_backend("expert_mlp", _MOE_IMPLS, x, backend)
    return impl(x, token_idx, expert_idx, gate_up, down)


def weighted_expert_mlp(
    x: torch.Tensor,
    token_idx: torch.LongTensor,
    expert_idx: torch.LongTensor,
    weight: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """``out[n] = Σ_{a: token_idx[a] = n} weight[a] · expert_mlp(...)[a]``: the MoE layer's routed output ``[N, H]``.

    Same inputs as :func:`expert_mlp` plus the routing weights ``[A]``; differentiable in x, weight and the experts.
    """
    impl = select_backend("weighted_expert_mlp", _WEIGHTED_MOE_IMPLS, x, backend)
    if torch.compiler.is_compiling():
        # A traced graph cannot hold the per-expert row counts: the PyTorch path as one opaque op (Triton's
        # launches read the counts on the host too).
        return traceable_weighted_expert_mlp(x, token_idx, expert_idx, weight, gate_up, down)
    return impl(x, token_idx, expert_idx, weight, gate_up, down)


def krr_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    ridge: float,
    temperature: float,
    attention_mask: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Causal kernel-ridge-regression attention (Cubit): ``O_i = κ(q_i, K_S) (κ(K_S, K_S) + λ I)⁻¹ V_S`` over the real
    keys ``S = {j <= i}``, ``κ(a, b) = exp(τ (â·b̂ − 1))`` on unit-normalised vectors, λ = ridge, τ = temperature.

    q ``[B, T_q, H, D]`` (the last T_q positions: ``T_q = S`` full forward, ``T_q < S`` decode over a cache),
    k ``[B, S, H_kv, D]``, v ``[B, S, H_kv, D_v]``; attention_mask ``[B, S]`` marks real tokens. Returns
    ``[B, T_q, H, D_v]``. O(S³) per head (a Cholesky factor of the ``[S, S]`` Gram matrix). PyTorch only: no Triton
    kernel, since the Cholesky factorisation and triangular solves dominate and are already library calls.
    """
    impl = select_backend("krr_attention", {"torch": krr_attention_torch}, q, backend)
    return impl(q, k, v, ridge=ridge, temperature=temperature, attention_mask=attention_mask)
