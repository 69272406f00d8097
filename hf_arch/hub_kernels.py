"""Our CPU kernels for transformers' own linear-attention models, through transformers' kernel hooks (opt-in).

transformers routes the gated delta rule and Kimi Delta Attention of its built-in hybrids (Qwen3-Next, Qwen3.5,
OLMo-hybrid, Kimi Linear) through ``use_kernel_func_from_hub_with_fallback``: on CUDA they take fla or a Hub kernel,
on CPU its token-serial reference code. Those hooks are layers of the ``kernels`` library, and ``kernelize`` swaps
their forward for whatever the kernel mapping names for the device and mode. :func:`use_kernels` adds our chunked
and one-step kernels to that mapping for the CPU only (CUDA keeps fla and the Hub kernels) and, given a model,
kernelizes it with transformers' own ``set_use_kernels``. Nothing private is patched.

    import hf_arch
    model = hf_arch.use_kernels(AutoModelForCausalLM.from_pretrained("Qwen/Qwen3-Next-80B-A3B-Instruct"))

or register first and let ``from_pretrained(..., use_kernels=True)`` kernelize: ``hf_arch.use_kernels()``.
"""

from __future__ import annotations

from typing import Callable

from torch import nn

from .kernels.delta_rule.chunk import chunk_gated_delta_rule
from .kernels.delta_rule.recurrent import fused_recurrent_gated_delta_rule
from .kernels.kda.chunk import chunk_kda
from .kernels.kda.recurrent import fused_recurrent_kda

__all__ = ["KERNELS", "KERNEL_LAYERS", "kernel_mapping", "use_kernels"]


# transformers' hook name (the keys of its hub_kernels mapping) -> our implementation, looked up at every call.
KERNELS: dict[str, Callable] = {
    "chunk_gated_delta_rule": chunk_gated_delta_rule,
    "fused_recurrent_gated_delta_rule": fused_recurrent_gated_delta_rule,
    "chunk_kda": chunk_kda,
    "fused_recurrent_kda": fused_recurrent_kda,
}


def _chunked_layer(name: str) -> type[nn.Module]:
    """The stateless layer ``kernels`` swaps in for a chunked hook. Its forward has the hook's own parameters
    (``kernels`` checks their number and kinds): transformers' ``torch_chunk_gated_delta_rule`` /
    ``chunk_kimi_delta_attention``. Scale 1/sqrt(d_k) as theirs, ``cu_seqlens`` honoured, transformers' other
    keyword arguments ignored; the output in q's dtype, the state fp32."""

    class HfArchChunkKernel(nn.Module):
        has_backward = True  # plain autograd through our PyTorch kernels
        can_torch_compile = False

        def forward(self, query, key, value, g, beta, chunk_size=64, initial_state=None, output_final_state=False,
                    use_qk_l2norm_in_kernel=False, **kwargs):
            return KERNELS[name](query, key, value, g, beta, initial_state=initial_state,
                                 output_final_state=output_final_state, cu_seqlens=kwargs.get("cu_seqlens"),
                                 use_qk_l2norm=use_qk_l2norm_in_kernel, chunk_size=chunk_size)

    return HfArchChunkKernel


def _recurrent_layer(name: str) -> type[nn.Module]:
    """As :func:`_chunked_layer`, for the token-by-token hooks (``torch_recurrent_gated_delta_rule``,
    ``recurrent_kimi_delta_attention``): no chunk size."""

    class HfArchRecurrentKernel(nn.Module):
        has_backward = True
        can_torch_compile = False

        def forward(self, query, key, value, g, beta, initial_state=None, output_final_state=False,
                    use_qk_l2norm_in_kernel=False, **kwargs):
            return KERNELS[name](query, key, value, g, beta, initial_state=initial_state,
                                 output_final_state=output_final_state, cu_seqlens=kwargs.get("cu_seqlens"),
                                 use_qk_l2norm=use_qk_l2norm_in_kernel)

    return HfArchRecurrentKernel


# Which layer form each hook takes.
KERNEL_LAYERS: dict[str, Callable[[str], type[nn.Module]]] = {
    "chunk_gated_delta_rule": _chunked_layer,
    "fused_recurrent_gated_delta_rule": _recurrent_layer,
    "chunk_kda": _chunked_layer,
    "fused_recurrent_kda": _recurrent_layer,
}


class HfArchKernelRepository:
    """A ``kernels`` repository (its ``RepositoryProtocol``: ``load()`` returns the layer) for one of our functions,
    installed with hf-arch rather than downloaded."""

    def __init__(self, name: str) -> None:
        if name not in KERNEL_LAYERS:
            raise ValueError(f"no hf-arch kernel named {name!r}; known: {sorted(KERNEL_LAYERS)}")
        self.name = name

    def load(self) -> type[nn.Module]:
        return KERNEL_LAYERS[self.name](self.name)

    def __eq__(self, other) -> bool:
        return isinstance(other, HfArchKernelRepository) and other.name == self.name

    def __hash__(self) -> int:
        return hash(("hf_arch", self.name))

    def __str__(self) -> str:
        return f"hf_arch.hub_kernels ({self.name})"


def kernel_mapping() -> dict:
    """The ``kernels`` mapping of our CPU implementations: ``{hook name: {"cpu": repository}}`` (any mode)."""
    return {name: {"cpu": HfArchKernelRepository(name)} for name in KERNEL_LAYERS}


def _require_kernels():
    from transformers.utils import is_kernels_available

    if not is_kernels_available():
        raise ImportError(
            "hf_arch.use_kernels() plugs into transformers' kernel hooks, which need the `kernels` library in the "
            "version range transformers supports (pip install kernels)"
        )
    import kernels

    return kernels


def use_kernels(model: nn.Module | None = None, *, mode=None):
    """Register our CPU kernels for transformers' gated-delta-rule and KDA hooks; with a model, kernelize it.

    model: a transformers ``PreTrainedModel`` (e.g. Qwen3-Next, Qwen3.5, OLMo-hybrid, Kimi Linear) on CPU; its
    hooks are switched with ``model.set_use_kernels(True, mode=mode)`` (mode: a ``kernels.Mode``; default from
    ``model.training``). Returns the model (or None). Models on other devices keep their own mapping (fla / Hub).
    """
    kernels = _require_kernels()
    kernels.register_kernel_mapping(kernel_mapping(), inherit_mapping=True)
    if model is None:
        return None
    if not hasattr(model, "set_use_kernels"):
        raise TypeError(f"use_kernels(model): expected a transformers PreTrainedModel, got {type(model).__name__}")
    if model.use_kernels:  # re-kernelize (e.g. after registering): transformers skips a model already marked
        model.reset_kernels()
    model.set_use_kernels(True, mode=mode)
    return model
