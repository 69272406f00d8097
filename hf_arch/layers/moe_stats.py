"""Routing statistics of a MoE model, accumulated over forward passes while enabled.

    stats = enable_routing_stats(model)     # every sparse layer now counts its routing decisions
    model(**batch); model(**batch)
    print(stats.summary())                   # {"moe/active_experts_per_token": 1.7, ...}
    disable_routing_stats(model)

Reported: the load of each expert per layer (share of that layer's assignments), the share of assignments that
went to zero / copy / constant experts, FFN experts active per token, token-level sparsity (share of FFN experts a
token leaves idle) and chunk-level sparsity (share of FFN experts unused by a run of ``chunk_size`` consecutive
tokens, BlockFFN's CLS). Padding is excluded when the model was given a 2-D attention mask.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["RoutingStatsAccumulator", "enable_routing_stats", "disable_routing_stats"]


class RoutingStatsAccumulator:
    def __init__(self, num_ffn: int, num_zero: int, num_copy: int, num_constant: int, chunk_size: int = 8) -> None:
        self.num_ffn, self.num_zero, self.num_copy, self.num_constant = num_ffn, num_zero, num_copy, num_constant
        self.chunk_size = chunk_size
        self.reset()

    def reset(self) -> None:
        self.expert_counts: dict[int, torch.Tensor] = {}
        self.tokens = 0
        self.active_ffn = 0
        self.chunks = 0
        self.chunk_union = 0

    def add(self, layer_idx: int, selected: torch.Tensor, token_mask: torch.Tensor | None = None) -> None:
        """``selected [B, T, E]`` bool: the experts each token of one layer used; ``token_mask [B, T]``: which are
        real tokens (None: all)."""
        B, T, E = selected.shape
        real = self._real_tokens(token_mask, B, T, selected.device)
        selected = selected & real[..., None]
        counts = selected.sum(dim=(0, 1)).cpu()
        self.expert_counts[layer_idx] = self.expert_counts.get(layer_idx, torch.zeros(E, dtype=torch.long)) + counts
        ffn = selected[..., : self.num_ffn]
        self.tokens += int(real.sum())
        self.active_ffn += int(ffn.sum())
        c = self.chunk_size
        full = (T // c) * c  # whole chunks only: a partial chunk would look sparser than it is
        if full:
            chunk_real = real[:, :full].view(B, -1, c).all(-1)
            union = ffn[:, :full].view(B, -1, c, self.num_ffn).any(dim=2)  # [B, chunks, E_ffn]
            self.chunks += int(chunk_real.sum())
            self.chunk_union += int((union & chunk_real[..., None]).sum())

    @staticmethod
    def _real_tokens(mask: torch.Tensor | None, B: int, T: int, device) -> torch.Tensor:
        if mask is not None and mask.shape == (B, T):
            return mask.to(device=device, dtype=torch.bool)
        return torch.ones(B, T, dtype=torch.bool, device=device)

    def per_layer_load(self) -> dict[int, list[float]]:
        """Each layer's share of assignments per routed expert (FFN experts first, then zero / copy / constant)."""
        return {
            layer: (counts.double() / max(int(counts.sum()), 1)).tolist()
            for layer, counts in sorted(self.expert_counts.items())
        }

    def summary(self) -> dict[str, float]:
        """Scalars for logs (keys prefixed ``moe/``)."""
        if not self.expert_counts:
            return {}
        total = sum(self.expert_counts.values())
        assignments = max(int(total.sum()), 1)
        z0, c0 = self.num_ffn, self.num_ffn + self.num_zero
        k0 = c0 + self.num_copy
        layer_tokens = max(self.tokens, 1)
        result = {
            "moe/active_experts_per_token": self.active_ffn / layer_tokens,
            "moe/token_level_sparsity": 1.0 - self.active_ffn / (layer_tokens * self.num_ffn),
            # Largest expert's load relative to a perfectly balanced one (1.0 = balanced), worst layer.
            "moe/max_load_ratio": max(
                float(counts[: self.num_ffn].max()) * self.num_ffn / max(int(counts[: self.num_ffn].sum()), 1)
                for counts in self.expert_counts.values()
            ),
        }
        if self.chunks:
            result[f"moe/chunk_level_sparsity_{self.chunk_size}"] = 1.0 - self.chunk_union / (self.chunks * self.num_ffn)
        if self.num_zero + self.num_copy + self.num_constant:
            result["moe/zero_expert_share"] = float(total[z0:c0].sum()) / assignments
            result["moe/copy_expert_share"] = float(total[c0:k0].sum()) / assignments
            result["moe/constant_expert_share"] = float(total[k0:].sum()) / assignments
            result["moe/zero_computation_share"] = float(total[z0:].sum()) / assignments
        return result


def _moe_layers(model: nn.Module):
    from .moe import HfArchMoE

    return [module for module in model.modules() if isinstance(module, HfArchMoE)]


def enable_routing_stats(model: nn.Module, chunk_size: int | None = None) -> RoutingStatsAccumulator:
    """Attach one accumulator to every sparse layer of ``model`` (and return it)."""
    layers = _moe_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no sparse (MoE) layers to collect routing statistics from")
    config = model.config
    stats = RoutingStatsAccumulator(
        config.num_ffn_experts, config.moe_zero_experts, config.moe_copy_experts, config.moe_constant_experts,
        chunk_size=chunk_size or config.moe_cls_chunk_size,
    )
    for layer in layers:
        layer.stats = stats
    return stats


def disable_routing_stats(model: nn.Module) -> None:
    for layer in _moe_layers(model):
        layer.stats = None
