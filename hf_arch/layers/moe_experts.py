"""The experts of a MoE layer: SwiGLU FFN experts as two 3-D weights, and MoE++'s zero-computation experts.

FFN experts use transformers' layout (``gate_up_proj [E, 2I, H]`` with the gate rows first, ``down_proj [E, H, I]``),
so Qwen-MoE-style checkpoints map key for key and PEFT reaches them with ``LoraConfig(target_parameters=[...])``.
A ``global`` pool is one such module at ``model.expert_pool``, passed to every sparse layer at call time, so its
weights exist (and are saved) once.
"""

from __future__ import annotations

import torch
from torch import nn

from ..kernels.ops import weighted_expert_mlp

__all__ = ["HfArchExperts", "ZeroComputationExperts"]


class HfArchExperts(nn.Module):
    # Read by peft_utils: peft reaches the 3-D weights through LoraConfig(target_parameters=...), named with
    # this module's attribute ("experts.gate_up_proj", or "expert_pool.gate_up_proj" for a global pool).
    lora_target_parameters = ("gate_up_proj", "down_proj")
    lora_targets_qualified = True
    new_parameters = ("*",)

    def __init__(self, config, num_experts: int) -> None:
        super().__init__()
        self.num_experts = num_experts
        H, I = config.hidden_size, config.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * I, H))
        self.down_proj = nn.Parameter(torch.empty(num_experts, H, I))
        self._std = config.initializer_range
        # Expert parallelism (expert_parallel.shard_experts sets both): this process's slice of the table and the
        # dispatch that runs the experts across processes (modeling code imports nothing of it).
        self.shard = None
        self.parallel_dispatch = None

    def init_parameters(self, init) -> None:
        init.normal_(self.gate_up_proj, mean=0.0, std=self._std)
        init.normal_(self.down_proj, mean=0.0, std=self._std)

    def forward(self, x: torch.Tensor, token_idx: torch.LongTensor, expert_idx: torch.LongTensor,
                weight: torch.Tensor) -> torch.Tensor:
        """``[N, H]``: ``Σ_a weight[a] · expert_{expert_idx[a]}(x[token_idx[a]])`` per token (grouped matmuls in
        expert-sorted order; one Triton launch per GEMM on CUDA)."""
        if self.parallel_dispatch is not None:
            return self.parallel_dispatch(x, token_idx, expert_idx, weight, self.gate_up_proj, self.down_proj)
        return weighted_expert_mlp(x, token_idx, expert_idx, weight, self.gate_up_proj, self.down_proj)


class ZeroComputationExperts(nn.Module):
    """MoE++'s experts without an FFN. Ids (relative): zero ``[0, Z)``, copy ``[Z, Z+C)``, constant after.

    zero → 0 (the token is dropped from this layer's FFN), copy → x (the token skips it),
    constant j → ``a₁·x + a₂·v_j`` with ``[a₁, a₂] = softmax(W_j x)`` and ``v_j`` learned.
    """

    new_parameters = ("*",)  # read by peft_utils

    def __init__(self, config) -> None:
        super().__init__()
        self.num_zero = config.moe_zero_experts
        self.num_copy = config.moe_copy_experts
        self.num_constant = config.moe_constant_experts
        H = config.hidden_size
        self.constant_vectors = nn.Parameter(torch.empty(self.num_constant, H)) if self.num_constant else None
        self.constant_mix = nn.Linear(H, 2 * self.num_constant, bias=False) if self.num_constant else None
        self._std = config.initializer_range

    def init_parameters(self, init) -> None:
        if self.constant_vectors is not None:
            init.normal_(self.constant_vectors, mean=0.0, std=self._std)

    def forward(self, x: torch.Tensor, token_idx: torch.LongTensor, expert_idx: torch.LongTensor,
                weight: torch.Tensor, out: torch.Tensor) -> None:
        """Add ``weight · expert(x)`` into ``out [N, H]`` for assignments to zero-computation experts
        (``expert_idx`` relative to the first of them). Zero experts add nothing and cost nothing."""
        if torch.compiler.is_compiling():
            self._add_static(x, token_idx, expert_idx, weight, out)
            return
        is_copy = (expert_idx >= self.num_zero) & (expert_idx < self.num_zero + self.num_copy)
        if is_copy.any():
            tokens = token_idx[is_copy]
            out.index_add_(0, tokens, x[tokens] * weight[is_copy, None].to(x.dtype))
        is_constant = expert_idx >= self.num_zero + self.num_copy
        if is_constant.any():
            tokens = token_idx[is_constant]
            j = expert_idx[is_constant] - (self.num_zero + self.num_copy)
            x_c = x[tokens]
            mix = self.constant_mix(x_c).view(-1, self.num_constant, 2).float().softmax(dim=-1)
            mix = mix[torch.arange(j.numel(), device=j.device), j].to(x.dtype)  # [A_c, 2]
            value = mix[:, :1] * x_c + mix[:, 1:] * self.constant_vectors[j].to(x.dtype)
            out.index_add_(0, tokens, value * weight[is_constant, None].to(x.dtype))

    def _add_static(self, x, token_idx, expert_idx, weight, out) -> None:
        """The same sums over every assignment with masks instead of selections (no data-dependent shapes, for a
        traced graph): each kind's weight is 0 on the other kinds' assignments."""
        zero = torch.zeros_like(weight)
        is_copy = (expert_idx >= self.num_zero) & (expert_idx < self.num_zero + self.num_copy)
        x_a = x.index_select(0, token_idx)
        if self.num_copy:
            out.index_add_(0, token_idx, x_a * torch.where(is_copy, weight, zero)[:, None].to(x.dtype))
        if self.num_constant:
            is_constant = expert_idx >= self.num_zero + self.num_copy
            j = (expert_idx - (self.num_zero + self.num_copy)).clamp(0, self.num_constant - 1)
            mix = self.constant_mix(x_a).view(-1, self.num_constant, 2).float().softmax(dim=-1)
            mix = mix.gather(1, j[:, None, None].expand(-1, 1, 2)).squeeze(1).to(x.dtype)  # [A, 2]
            value = mix[:, :1] * x_a + mix[:, 1:] * self.constant_vectors[j].to(x.dtype)
            out.index_add_(0, token_idx, value * torch.where(is_constant, weight, zero)[:, None].to(x.dtype))
