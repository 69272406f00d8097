"""``sinkhorn``: Selective Sinkhorn Routing. Token-to-expert assignment as a balanced optimal-transport problem whose
plan gives the gate scores, solved only when a batch needs it; no load-balance loss.

The plan ``P = diag(u) exp(logits) diag(v)`` with rows summing to 1 (each token's mass) and columns to ``N/E`` (each
expert's fair share) is found by alternating the two normalisations (Sinkhorn). A row of ``P``, normalised, is
``softmax(logits + log v)``: the plan only adds a per-expert offset ``log v`` to the logits. So the router keeps that
offset as a buffer (``column_potential``) and routes every token by the top-k of ``logits + column_potential``:

- training: when the batch's expert loads under the current offset exceed ``moe_sinkhorn_imbalance`` × the mean
  (the selective part), ``moe_sinkhorn_iterations`` Sinkhorn steps warm-started from the buffer re-solve ``log v`` on
  this batch, route with it, and move the buffer toward it (running average, momentum ``POTENTIAL_MOMENTUM``);
  balanced batches skip Sinkhorn entirely;
- inference: the buffer alone, so each token's route depends on that token only (cached decoding equals the full
  forward, and one sequence routes the same in any batch).

The gradient reaches the logits through ``softmax(logits + log v)`` (``log v`` held fixed, as the plan's solution).
The logits the layer reports are ``logits + log v``, so routing statistics and any auxiliary loss see what was used.
"""

from __future__ import annotations

import torch

from .base import MoERouter, Routing, register_moe_router

POTENTIAL_MOMENTUM = 0.9


def sinkhorn_column_potential(logits: torch.Tensor, iterations: int, start: torch.Tensor) -> torch.Tensor:
    """``log v [E]`` of the balanced plan for ``logits [N, E]`` after ``iterations`` alternating normalisations in
    log space (rows to 1, columns to ``N/E``), from ``log v = start``; shifted to mean 0 (softmax ignores a shift)."""
    N, E = logits.shape
    log_v = start.to(logits.dtype).clone()
    column_mass = torch.log(torch.tensor(N / E, dtype=logits.dtype, device=logits.device))
    for _ in range(iterations):
        log_u = -torch.logsumexp(logits + log_v, dim=1, keepdim=True)
        log_v = column_mass - torch.logsumexp(logits + log_u, dim=0)
    return log_v - log_v.mean()


@register_moe_router("sinkhorn")
class SinkhornRouter(MoERouter):
    config_options = ("moe_norm_topk_prob", "moe_sinkhorn_iterations", "moe_sinkhorn_imbalance")

    def __init__(self, config, num_routed: int, gating_residual: bool) -> None:
        super().__init__(config, num_routed, gating_residual)
        self.norm_topk_prob = config.moe_norm_topk_prob
        self.iterations = config.moe_sinkhorn_iterations
        self.imbalance = config.moe_sinkhorn_imbalance
        self.register_buffer("column_potential", torch.zeros(num_routed), persistent=True)
        self.sinkhorn_batches = 0  # how many training batches needed Sinkhorn (the "selective" share)
        self.training_batches = 0

    def init_parameters(self, init) -> None:
        super().init_parameters(init)
        self.column_potential.zero_()

    @staticmethod
    def probabilities(logits: torch.Tensor) -> torch.Tensor:
        return logits.softmax(dim=-1)

    def _imbalanced(self, shifted: torch.Tensor) -> bool:
        N, E = shifted.shape
        chosen = shifted.topk(self.top_k, dim=-1).indices.reshape(-1)
        load = torch.bincount(chosen, minlength=E).float()
        return bool(load.max() > self.imbalance * (N * self.top_k / E))

    def route(self, logits: torch.Tensor) -> Routing:
        N = logits.shape[0]
        potential = self.column_potential.to(logits.dtype)
        if self.training and N > 1:
            with torch.no_grad():
                self.training_batches += 1
                if self._imbalanced(logits.detach() + potential):
                    self.sinkhorn_batches += 1
                    potential = sinkhorn_column_potential(logits.detach(), self.iterations, potential)
                    self.column_potential.mul_(POTENTIAL_MOMENTUM).add_(
                        (1.0 - POTENTIAL_MOMENTUM) * potential.to(self.column_potential.dtype))
        shifted = logits + potential
        probs = shifted.softmax(dim=-1)
        top_scores, top_experts = probs.topk(self.top_k, dim=-1)
        if self.norm_topk_prob:
            top_scores = top_scores / top_scores.sum(dim=-1, keepdim=True).clamp_min(1e-9)
        token_idx = torch.arange(N, device=logits.device).repeat_interleave(self.top_k)
        return Routing(shifted, token_idx, top_experts.reshape(-1), top_scores.reshape(-1))
