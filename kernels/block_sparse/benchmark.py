"""Block-sparse attention's rows in ``hf-arch bench kernels``: our op at fixed block densities, to read against the
dense SDPA row of the same T (the table's "× vs SDPA" columns).

Found by ``recipes.kernel_benchmark.registered_kernel_impls``. Masks are random at each density (each causal block
kept independently, the diagonal and the first block always), blocks of 64 tokens, one mask per head.

    hf-arch bench kernels --ops block_sparse_attention causal_attention --seq-lens 2048 4096 8192 --skip-decode --json
"""

from __future__ import annotations

import math

import torch

__all__ = ["kernel_benchmark_impls", "random_block_mask"]

OURS = "hf_arch"
BLOCK_SIZE = 64
DENSITIES = (0.25, 0.5)


def random_block_mask(N: int, H: int, density: float, generator: torch.Generator) -> torch.Tensor:
    """``[1, H, N, N]`` bool: causal blocks kept with probability ``density``, plus the diagonal and first block."""
    causal = torch.ones(N, N, dtype=torch.bool).tril()
    keep = (torch.rand(H, N, N, generator=generator) < density) & causal
    keep |= torch.eye(N, dtype=torch.bool)
    keep[..., 0] = True
    return keep[None]


def kernel_benchmark_impls(device: str) -> list[tuple[str, str, object, object]]:
    """``(op, impl, prepare(shared inputs) -> tensors, run(tensors) -> output)``, one row per density."""
    from ..ops import block_sparse_attention

    def prepare(density):
        def inputs(x: dict) -> dict:
            B, T, H, _ = x["q"].shape
            masks = [random_block_mask(math.ceil(T / BLOCK_SIZE), H, density, torch.Generator().manual_seed(b))
                     for b in range(B)]
            return {"q": x["q"], "k": x["k"], "v": x["v"], "mask": torch.cat(masks).to(x["q"].device)}

        return inputs

    backends = ["torch"] + (["triton"] if torch.device(device).type == "cuda" else [])
    return [("block_sparse_attention", f"{OURS}.{backend} d={density}", prepare(density),
             (lambda t, backend=backend: block_sparse_attention(t["q"], t["k"], t["v"], t["mask"], BLOCK_SIZE,
                                                                backend=backend)))
            for density in DENSITIES for backend in backends]
