"""fla (flash-linear-attention) as the CUDA backend of GLA, the gated delta rule and KDA.

fla's chunked Triton kernels are the fastest there are for these ops on GPUs (transformers itself uses them for
Qwen3-Next and Kimi Linear when installed), and our ops already follow fla's conventions: ``[B, T, H, *]`` layout,
gates in log space, ``scale`` defaulting to ``K ** -0.5``, the q/k L2 norm with eps inside the square root, states
``[N, H, K, V]`` with ``cu_seqlens`` packing N sequences in a batch of one. What is left to map is the keywords (fla's
``fused_recurrent_gated_delta_rule`` takes ``g, gk, gv, beta`` in that order, so every argument goes by name), the
kernel choice per length (fla's fused recurrent kernels for decoding, the chunked ones otherwise, as our PyTorch path
does) and our dtype contract (final states in fp32).

Only fla releases whose signatures were checked against this mapping are used (:data:`FLA_MIN_VERSION`); with an older
one, or none, the ops fall back to our own Triton kernels. The mapping is tested on CPU against fla's pure-PyTorch
references (``tests/kernels/test_fla_backend.py``); fla's Triton kernels themselves need a GPU.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import importlib.util
import logging
import re
from typing import Callable, Optional


fla_logger = logging.getLogger(__name__)

# The oldest fla whose kernel signatures this module was checked against (tests/kernels/test_fla_backend.py).
FLA_MIN_VERSION = (0, 6, 0)
# Distributions that ship the ``fla`` package: fla-core (0.3 on) and the older all-in-one wheel.
_FLA_DISTRIBUTIONS = ("fla-core", "flash-linear-attention")

# op -> (fla module, chunked kernel, fused recurrent kernel)
FLA_KERNELS = {
    "gla": ("fla.ops.gla", "chunk_gla", "fused_recurrent_gla"),
    "gated_delta_rule": ("fla.ops.gated_delta_rule", "chunk_gated_delta_rule", "fused_recurrent_gated_delta_rule"),
    "kda": ("fla.ops.kda", "chunk_kda", "fused_recurrent_kda"),
    # Lightning attention: fla's simple_gla with a per-head constant log decay g_gamma (what fla.ops.lightning_attn
    # computes from layer_idx / num_layers; ours takes the decays themselves).
    "lightning": ("fla.ops.simple_gla", "chunk_simple_gla", "fused_recurrent_simple_gla"),
}


def _parse_version(text: str) -> tuple[int, ...]:
    """``"0.7.1rc2"`` -> ``(0, 7, 1)``: the leading digits of each of the first three parts."""
    parts = []
    for piece in text.split(".")[:3]:
        digits = re.match(r"\d*", piece).group()
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


@functools.lru_cache(maxsize=None)
def fla_version() -> Optional[tuple[int, ...]]:
    """The installed fla's version, or None when ``fla`` cannot be found (read from metadata; fla is not imported)."""
    try:
        if importlib.util.find_spec("fla") is None:
            return None
    except (ImportError, ValueError):
        return None
    for dist in _FLA_DISTRIBUTIONS:
        try:
            return _parse_version(importlib.metadata.version(dist))
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def fla_usable() -> bool:
    """True when an fla release at least :data:`FLA_MIN_VERSION` is installed (logged once when it is too old)."""
    version = fla_version()
    if version is None:
        return False
    if version < FLA_MIN_VERSION:
        _warn_once(f"fla {'.'.join(map(str, version))} is older than the "
                  f"{'.'.join(map(str, FLA_MIN_VERSION))} this mapping was checked against; using our own kernels")
        return False
    return True


@functools.lru_cache(maxsize=None)
def _warn_once(message: str) -> None:
    fla_logger.warning(message)


def load_fla_kernel(op: str, recurrent: bool) -> Callable:
    """fla's fused recurrent (``recurrent``) or chunked kernel for ``op``, imported on first use."""
    module, chunked, fused_recurrent = FLA_KERNELS[op]
    return getattr(importlib.import_module(module), fused_recurrent if recurrent else chunked)


def _contiguous(*tensors):
    return tuple(None if t is None else t.contiguous() for t in tensors)


def _fp32_state(out):
    o, state = out
    return o, None if state is None else state.float()


def fla_gla(q, k, v, g, *, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None,
            recurrent_max_tokens=0):
    """:func:`..ops.gla` on fla's kernels."""
    q, k, v, g, initial_state = _contiguous(q, k, v, g, initial_state)
    recurrent = q.shape[1] <= recurrent_max_tokens
    kernel = load_fla_kernel("gla", recurrent)
    gate = {"gk": g} if recurrent else {"g": g}  # the fused recurrent kernel also takes a value gate gv
    return _fp32_state(kernel(q=q, k=k, v=v, **gate, scale=scale, initial_state=initial_state,
                              output_final_state=output_final_state, cu_seqlens=cu_seqlens))


def fla_gated_delta_rule(q, k, v, g, beta, *, scale=None, initial_state=None, output_final_state=False,
                         cu_seqlens=None, use_qk_l2norm=False, recurrent_max_tokens=0):
    """:func:`..ops.gated_delta_rule` on fla's kernels (GVA: v, g, beta with HV = a multiple of q's H heads)."""
    q, k, v, g, beta, initial_state = _contiguous(q, k, v, g, beta, initial_state)
    kernel = load_fla_kernel("gated_delta_rule", q.shape[1] <= recurrent_max_tokens)
    return _fp32_state(kernel(q=q, k=k, v=v, g=g, beta=beta, scale=scale, initial_state=initial_state,
                              output_final_state=output_final_state, use_qk_l2norm_in_kernel=use_qk_l2norm,
                              cu_seqlens=cu_seqlens))


def fla_kda(q, k, v, g, beta, *, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None,
            use_qk_l2norm=False, recurrent_max_tokens=0):
    """:func:`..kda.kda` on fla's kernels; the per-channel log decay goes in fp32, as fla's kernels expect."""
    q, k, v, g, beta, initial_state = _contiguous(q, k, v, g.float(), beta, initial_state)
    kernel = load_fla_kernel("kda", q.shape[1] <= recurrent_max_tokens)
    return _fp32_state(kernel(q=q, k=k, v=v, g=g, beta=beta, scale=scale, initial_state=initial_state,
                              output_final_state=output_final_state, use_qk_l2norm_in_kernel=use_qk_l2norm,
                              cu_seqlens=cu_seqlens))


def fla_lightning(q, k, v, log_decay, *, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None,
                  recurrent_max_tokens=0):
    """:func:`..ops.lightning_attention` on fla's simple_gla kernels (``g_gamma``: the heads' log decays, or ``g`` per
    token where padding is masked out; fp32)."""
    q, k, v, initial_state = _contiguous(q, k, v, initial_state)
    kernel = load_fla_kernel("lightning", q.shape[1] <= recurrent_max_tokens)
    decay = log_decay.float().contiguous()  # per head: g_gamma; per token (padding masked out): g
    gate = {"g_gamma": decay} if decay.dim() == 1 else {"g": decay}
    return _fp32_state(kernel(q=q, k=k, v=v, **gate, scale=scale, initial_state=initial_state,
                              output_final_state=output_final_state, cu_seqlens=cu_seqlens))


_ADAPTERS = {"gla": fla_gla, "gated_delta_rule": fla_gated_delta_rule, "kda": fla_kda, "lightning": fla_lightning}


def fla_op(op: str, recurrent_max_tokens: int) -> dict[str, Callable]:
    """``{"fla": adapter}`` for an op's implementation table when a usable fla is installed, else ``{}``; inputs of at
    most ``recurrent_max_tokens`` tokens (decoding) go to fla's fused recurrent kernel, longer ones to the chunked."""
    if not fla_usable():
        return {}
    return {"fla": functools.partial(_ADAPTERS[op], recurrent_max_tokens=recurrent_max_tokens)}
