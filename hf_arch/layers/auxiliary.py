"""What a token mixer hands back besides its output: per-forward training terms and measurements, as return values.

Modes come in as forward arguments (the backbone passes them to every layer only when set):

- ``attention_transfer=True``: linear-attention layers return their softmax teacher's output (the source layer's
  function) and the MSE between their own linear output and it (LoLCATs-style stage 1);
- ``sparse_attention_mode``: ``"dense"`` (sparse-attention layers attend densely: the base model's function) or
  ``"gate_distillation"`` (seer layers attend densely and return their gate's KL to the pooled attention map).

A token mixer returns ``(output, attention weights or None)``, or ``(output, attention weights or None, auxiliary)``
when it has something to report: ``auxiliary`` is a dict whose keys are those of :data:`AUXILIARY_FIELDS`. The
decoder layer returns the values flat beside its hidden states (a reentrant gradient checkpoint carries gradients only
through the tensors a layer returns), and the model output gathers them per layer under the plural field name, in
layer order over the layers that reported one (as ``attentions`` skips linear layers).
"""

from __future__ import annotations

import torch

__all__ = ["AUXILIARY_FIELDS", "SPARSE_ATTENTION_MODES", "check_sparse_attention_mode", "merge_auxiliary",
           "mixer_result", "split_mixer_result"]

# Mixer key -> the model output field holding one entry per reporting layer.
AUXILIARY_FIELDS = {
    "transfer_loss": "transfer_losses",  # linear, attention_transfer: fp32 scalar MSE(linear, softmax teacher), grad
    "gate_loss": "gate_losses",  # seer, training or gate_distillation: KL(pooled attention ‖ gate), grad (gates only)
    "sparse_probability": "sparse_probabilities",  # flux: [B] P(sparse) per input, grad (routers)
    "sparse_choice": "sparse_choices",  # flux: [B] bool, the branch each input took (True = sparse)
    "block_counts": "sparse_block_counts",  # seer, sparse prefill: [2] long, (computed, causal) blocks
    "token_selection": "token_selections",  # delta selection layer: [B, T, S] bool, the keys each query keeps
    "attended_counts": "attended_counts",  # delta selection / sparse layer: [2] long, (keys attended, causal keys)
    "compute_loss": "compute_losses",  # acm channel mixer, training: fp32 scalar, weight × expected share run, grad
}
SPARSE_ATTENTION_MODES = ("dense", "gate_distillation")


def check_sparse_attention_mode(mode: str | None) -> None:
    if mode is not None and mode not in SPARSE_ATTENTION_MODES:
        raise ValueError(f"sparse_attention_mode must be None or one of {SPARSE_ATTENTION_MODES}, got {mode!r}")


def mixer_result(output: torch.Tensor, weights: torch.Tensor | None, auxiliary: dict | None = None) -> tuple:
    """A mixer's return value: ``(output, weights)``, plus ``auxiliary`` when it holds anything."""
    return (output, weights, auxiliary) if auxiliary else (output, weights)


def split_mixer_result(result: tuple) -> tuple[torch.Tensor, torch.Tensor | None, dict]:
    """``(output, weights, auxiliary dict)`` from a mixer's 2- or 3-tuple; unknown keys are refused by name."""
    output, weights, *rest = result
    auxiliary = (rest[0] if rest else None) or {}
    unknown = set(auxiliary) - set(AUXILIARY_FIELDS)
    if unknown:
        raise ValueError(f"token mixer returned unknown auxiliary outputs {sorted(unknown)}; known: "
                         f"{sorted(AUXILIARY_FIELDS)} (AUXILIARY_FIELDS, layers/auxiliary.py)")
    return output, weights, auxiliary


def merge_auxiliary(parts: list[dict]) -> dict:
    """One layer's auxiliary outputs over packed sequences run one by one: losses averaged, per-input values
    concatenated, block counts summed."""
    merged = {}
    for key in AUXILIARY_FIELDS:
        values = [part[key] for part in parts if key in part]
        if not values:
            continue
        if key in ("transfer_loss", "gate_loss", "compute_loss"):
            merged[key] = torch.stack(values).mean()
        elif key in ("block_counts", "attended_counts"):
            merged[key] = torch.stack(values).sum(0)
        else:
            merged[key] = torch.cat(values)
    return merged
