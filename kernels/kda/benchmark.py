"""KDA's rows in ``hf-arch bench kernels``: our ``kda`` op against transformers' ``chunk_kimi_delta_attention``.

Found by ``recipes.kernel_benchmark.registered_kernel_impls`` (nothing else lists it). Both impls get the same inputs:
the shared q/k/v, β, and a per-channel log decay ``logsigmoid(x)`` (GLA's gate of the shared inputs without its τ),
both with the q/k L2 norm and the scale ``K ** -0.5`` (transformers' fixed one). Our op runs its PyTorch backend
everywhere and its Triton backend on CUDA; transformers' wrapper runs fla's kernel on CUDA when fla is installed.

    hf-arch bench kernels --ops kda --seq-lens 512 1024 2048 --skip-decode --json kda.json
"""

from __future__ import annotations

import torch

__all__ = ["kernel_benchmark_impls"]

OURS = "hf_arch"
HF_FALLBACK = "transformers"


def _inputs(x: dict) -> dict:
    return {"q": x["q"], "k": x["k"], "v": x["v"], "g": (x["g_gla"].float() * 16), "beta": x["beta"]}


def kernel_benchmark_impls(device: str) -> list[tuple[str, str, object, object]]:
    """``(op, impl, prepare(shared inputs) -> tensors, run(tensors) -> (o, final_state))``."""
    from . import _KDA_IMPLS, kda

    def ours(backend):
        return lambda t: kda(t["q"], t["k"], t["v"], t["g"], t["beta"], output_final_state=True, use_qk_l2norm=True,
                             backend=backend)

    impls = [("kda", f"{OURS}.torch", _inputs, ours("torch"))]
    if torch.device(device).type == "cuda":
        impls.append(("kda", f"{OURS}.triton", _inputs, ours("triton")))
        if "fla" in _KDA_IMPLS:  # fla's chunked kernel through our adapter
            impls.append(("kda", "fla", _inputs, ours("fla")))
    try:
        from transformers.models.kimi_linear.modeling_kimi_linear import chunk_kimi_delta_attention
    except ImportError:  # a transformers without Kimi Linear: ours alone (no ratio)
        return impls

    if torch.device(device).type == "cpu":
        # its PyTorch fallback: the hub-kernel wrapper of transformers < 5.25 would call fla's Triton kernel on CPU
        # tensors whenever fla is installed
        chunk_kimi_delta_attention = getattr(chunk_kimi_delta_attention, "__wrapped__", chunk_kimi_delta_attention)

    def hf(t):  # scale fixed at K**-0.5 there; its l2norm flag is use_qk_l2norm_in_kernel
        return chunk_kimi_delta_attention(t["q"], t["k"], t["v"], t["g"], t["beta"], output_final_state=True,
                                          use_qk_l2norm_in_kernel=True)

    impls.append(("kda", HF_FALLBACK, _inputs, hf))
    return impls
