"""Block-sparse attention's rows in ``hf-arch bench kernels``: our op at fixed block densities, to read against the
dense SDPA row of the same T (the table's "× vs SDPA" columns).

Found by ``recipes.kernel_benchmark.registered_kernel_impls``. Masks are random at each density (that share of the
causal blocks, the diagonal and the first block among them), blocks of 64 tokens, one mask per head.

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
    """``[1, H, N, N]`` bool holding ``density`` of the causal blocks per head (rounded; never fewer than the
    diagonal and the first block, which are always kept), the others drawn uniformly among the causal blocks."""
    causal = torch.ones(N, N, dtype=torch.bool).tril()
    forced = torch.eye(N, dtype=torch.bool)
    forced[:, 0] = True
    optional = torch.nonzero((causal & ~forced).flatten()).flatten()
    extra = min(len(optional), max(0, round(density * N * (N + 1) / 2) - int(forced.sum())))
    heads = []
    for _ in range(H):
        keep = forced.clone().flatten()
        keep[optional[torch.randperm(len(optional), generator=generator)[:extra]]] = True
        heads.append(keep.view(N, N))
    return torch.stack(heads)[None]


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
