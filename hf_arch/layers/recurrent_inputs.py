"""What every recurrent token mixer (GLA / Gated DeltaNet, KDA, Lightning) reads before its projections.

- the 2-D ``[B, past + T]`` padding mask, if that is what ``attention_mask`` holds (a 4-D mask is ignored: the
  recurrence is causal by construction), and the new tokens' part of it as a bool ``[B, T]``;
- the layer's cache entry, extended to count the tokens it takes in (``token_count_cache``);
- a refusal, naming the layer, of attention-transfer mode under a cache (the teacher runs on whole sequences).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .token_count_cache import token_count_layer

__all__ = ["RecurrentInputs", "recurrent_inputs"]


@dataclass
class RecurrentInputs:
    key_mask: torch.Tensor | None  # [B, past + T] padding mask (1 = token) or None
    token: torch.Tensor | None  # [B, T] bool: the new tokens that are real, or None (all are)
    cache_layer: object | None  # the layer's token-counting cache entry, or None without a cache


def recurrent_inputs(mixer, num_new: int, attention_mask, past_key_values, attention_transfer: bool = False,
                     cache_entry=token_count_layer):
    """``cache_entry(cache, layer_idx)``: how the layer's cache entry is extended (token counting by default; a
    STILL layer keeps saliencies too, ``saliency_cache``)."""
    if attention_transfer and past_key_values is not None:
        raise ValueError(f"{type(mixer).__name__} (layer {mixer.layer_idx}): attention_transfer mode runs without a "
                         "cache; call the model with use_cache=False (and no past_key_values)")
    key_mask = attention_mask if attention_mask is not None and attention_mask.dim() == 2 else None
    token = key_mask[:, -num_new:].to(torch.bool) if key_mask is not None else None
    layer = cache_entry(past_key_values, mixer.layer_idx) if past_key_values is not None else None
    return RecurrentInputs(key_mask, token, layer)
