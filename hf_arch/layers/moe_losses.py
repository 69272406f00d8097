"""Auxiliary MoE losses, computed from the sparse layers' router logits (``[B, T, E]`` each, fp32).

- load balance (Switch): ``E · Σ_e η_e f_e P_e`` with ``f_e`` the share of assignments expert ``e`` received and
  ``P_e`` its mean routing probability; 1 when routing is uniform. ``η_e`` is 1 for FFN experts and
  ``moe_zc_balance_weight`` for zero-computation ones (MoE++). Per layer (then averaged) or, for a global pool,
  over the tokens of every layer at once (UniPool's pool-level balance).
- z-loss: ``mean(logsumexp(logits)²)``, keeps router logits small.
- BlockFFN token-level sparsity: mean ReLU router activation (an L1 penalty).
- BlockFFN chunk-level sparsity: for each run of ``c`` consecutive tokens, ``1 − Π_t (1 − tanh(a_t,e))``, the soft
  probability that expert ``e`` serves any of them; its mean is pushed down so neighbouring tokens share experts.

Padding (``attention_mask == 0``) is left out of every term.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..configuration import MOE_ROUTER_SPECS, moe_layer_capacity
from .moe_routers import routing_probabilities, selected_mask

__all__ = ["moe_auxiliary_losses", "load_balance_loss", "chunk_sparsity_loss", "consistency_loss",
           "consistency_regularised"]


def _token_weights(logits: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """``[B, T]`` fp32: 1 for real tokens, 0 for padding (the mask is used only when it lines up with the logits)."""
    B, T = logits.shape[:2]
    if attention_mask is not None and attention_mask.dim() == 2 and attention_mask.shape == (B, T):
        return attention_mask.to(device=logits.device, dtype=torch.float32)
    return logits.new_ones(B, T)


def load_balance_loss(layer_logits: list[torch.Tensor], config, attention_mask=None,
                      sparse_indices: list[int] | None = None) -> torch.Tensor:
    """Switch-style balance over the given layers' tokens taken together (``sparse_indices``: which sparse layers they
    are, for a per-layer capacity; default the first ones)."""
    probability_mass, selection_count, total_assignments = 0.0, 0.0, 0.0
    tokens = 0.0
    for n, logits in enumerate(layer_logits):
        w = _token_weights(logits, attention_mask)[..., None]
        probs = routing_probabilities(logits, config.moe_router)
        capacity = moe_layer_capacity(config, sparse_indices[n] if sparse_indices is not None else n)
        chosen = selected_mask(logits, config.moe_router, capacity, config).float()
        probability_mass = probability_mass + (probs * w).sum(dim=(0, 1))
        selection_count = selection_count + (chosen * w).sum(dim=(0, 1))
        total_assignments = total_assignments + (chosen * w).sum()
        tokens = tokens + w.sum()
    E = layer_logits[0].shape[-1]
    P = probability_mass / tokens.clamp_min(1.0)
    f = selection_count / total_assignments.clamp_min(1.0)
    eta = torch.ones(E, device=P.device)
    eta[config.num_ffn_experts:] = config.moe_zc_balance_weight
    return E * (eta * f * P).sum()


def chunk_sparsity_loss(logits: torch.Tensor, chunk: int, attention_mask=None) -> torch.Tensor:
    """Mean over chunks and experts of the soft probability that an expert is used within a chunk."""
    B, T, E = logits.shape
    w = _token_weights(logits, attention_mask)
    p = torch.tanh(F.relu(logits)) * w[..., None]
    pad = (-T) % chunk
    if pad:
        p = F.pad(p, (0, 0, 0, pad))
        w = F.pad(w, (0, pad))
    p = p.view(B, -1, chunk, E)
    used = 1.0 - torch.prod(1.0 - p, dim=2)  # [B, chunks, E]
    real_chunk = (w.view(B, -1, chunk).sum(-1) > 0).float()
    return (used.mean(-1) * real_chunk).sum() / real_chunk.sum().clamp_min(1.0)


def moe_auxiliary_losses(router_logits, config, attention_mask=None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``(weighted total, {term: unweighted value})`` for the config's non-zero coefficients."""
    layers = [logits for logits in router_logits if logits is not None]
    terms: dict[str, torch.Tensor] = {}
    if not layers:
        return torch.zeros(()), terms
    if config.moe_load_balance_coef:
        if config.moe_load_balance_scope == "pool":
            terms["load_balance"] = load_balance_loss(layers, config, attention_mask)
        else:
            terms["load_balance"] = torch.stack([load_balance_loss([l], config, attention_mask, [n])
                                                 for n, l in enumerate(layers)]).mean()
    if config.moe_z_loss_coef:
        z = [(torch.logsumexp(l, dim=-1).pow(2) * _token_weights(l, attention_mask)).sum()
             / _token_weights(l, attention_mask).sum().clamp_min(1.0) for l in layers]
        terms["z_loss"] = torch.stack(z).mean()
    if config.moe_tls_coef:
        tls = [(F.relu(l).mean(-1) * _token_weights(l, attention_mask)).sum()
               / _token_weights(l, attention_mask).sum().clamp_min(1.0) for l in layers]
        terms["token_sparsity"] = torch.stack(tls).mean()
    if config.moe_cls_coef:
        cls = [chunk_sparsity_loss(l, config.moe_cls_chunk_size, attention_mask) for l in layers]
        terms["chunk_sparsity"] = torch.stack(cls).mean()
    coefficients = {"load_balance": config.moe_load_balance_coef, "z_loss": config.moe_z_loss_coef,
                    "token_sparsity": config.moe_tls_coef, "chunk_sparsity": config.moe_cls_coef}
    total = sum(coefficients[name] * value for name, value in terms.items())
    if not terms:
        total = layers[0].new_zeros(())
    return total, terms


def consistency_regularised(config) -> bool:
    """THOR: does training pair two randomly routed passes (a router reading ``moe_consistency_coef``, non-zero)?"""
    spec = MOE_ROUTER_SPECS.get(getattr(config, "moe_router", None))
    return (spec is not None and "moe_consistency_coef" in spec.options and "sparse" in config.mlp_layer_types
            and config.moe_consistency_coef > 0)


def consistency_loss(logits_a: torch.Tensor, logits_b: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """THOR's consistency term: ``½ (KL(p_a ‖ p_b) + KL(p_b ‖ p_a))`` of the next-token distributions of two passes,
    averaged over the positions that have a label (``labels`` unshifted, -100 ignored, as the LM loss reads them)."""
    a, b = logits_a[:, :-1].float().log_softmax(-1), logits_b[:, :-1].float().log_softmax(-1)
    real = (labels[:, 1:] != -100).to(a.device)
    per_token = 0.5 * ((a.exp() * (a - b)).sum(-1) + (b.exp() * (b - a)).sum(-1))
    return (per_token * real).sum() / real.sum().clamp_min(1)
