"""The ``delta`` token mixer: DELTA ("Dynamic Layer-Aware Token Attention for Efficient Long-Context Reasoning"),
training-free sparse attention on a softmax model's own weights.

The layers fall in three groups (``config.mixer_options["delta"]``):

- **dense** (the first ``dense_layers``): full attention, as the source;
- **selection** (``selection_layers``): full attention too, and from its probabilities summed over the heads each
  query keeps its ``token_budget`` most attended keys, plus the first ``sink_tokens`` and the last
  ``window_tokens`` of its context;
- **sparse** (every other layer): each query attends only to the keys the latest selection layer chose for it.

The KV cache stays whole (every layer stores every key): a later selection may pick any of them. Selection is per
query from scores the model computes anyway, so decoding one token at a time selects what the full forward selects
for that position (decode equals the full forward), and a query whose context fits in the budget, the sinks and the
window attends to all of it (exact at short lengths). Layers report ``attended_counts`` (keys attended, keys in
the causal context) so the share of attended tokens can be measured; selection layers hand their choice to the next
layers as the ``token_selection`` auxiliary output.

Sinks and windows are counted among the keys a query may attend (its own sequence's first and last keys, whatever
the left padding or packing). Packing through ``cu_seqlens`` is refused (the backbone passes it only to layouts
with linear layers; softmax layers read packing from the mask).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .attention import HfArchAttention, repeat_kv
from .auxiliary import mixer_result
from .mixer_registry import mixer_options, register_token_mixer
from .rope import apply_rotary_pos_emb

__all__ = ["DeltaAttention", "DeltaOptions", "delta_attended_share"]

QUERY_CHUNK = 256  # queries per step of the selection / sparse attention (bounds the [B, H, chunk, S] scores)


@dataclass(frozen=True)
class DeltaOptions:
    dense_layers: int = 2
    selection_layers: tuple[int, ...] | None = None  # None: the first layer after the dense ones and the middle one
    token_budget: int = 256
    sink_tokens: int = 4
    window_tokens: int = 64

    def __post_init__(self) -> None:
        for name, minimum in (("dense_layers", 0), ("token_budget", 1), ("sink_tokens", 0), ("window_tokens", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                raise ValueError(f"mixer_options['delta'].{name} must be an integer >= {minimum}, got {value!r}")
        if self.selection_layers is not None:
            if not all(isinstance(i, int) and not isinstance(i, bool) for i in self.selection_layers):
                raise ValueError("mixer_options['delta'].selection_layers must be layer indices, got "
                                 f"{self.selection_layers!r}")
            object.__setattr__(self, "selection_layers", tuple(sorted(set(self.selection_layers))))

    def roles(self, num_layers: int) -> list[str]:
        """``"dense" | "selection" | "sparse"`` per layer, refusing a layout where a sparse layer has no selection."""
        if self.dense_layers >= num_layers:
            raise ValueError(f"mixer_options['delta'].dense_layers ({self.dense_layers}) must be smaller than the "
                             f"number of layers ({num_layers}): no layer would be sparse")
        selection = self.selection_layers
        if selection is None:
            middle = self.dense_layers + (num_layers - self.dense_layers) // 2
            selection = tuple(sorted({self.dense_layers, middle}))
        outside = [i for i in selection if not self.dense_layers <= i < num_layers]
        if outside:
            raise ValueError(f"mixer_options['delta'].selection_layers {outside} are out of range: selection layers "
                             f"come after the {self.dense_layers} dense layers and before layer {num_layers}")
        if selection[0] != self.dense_layers:
            raise ValueError(f"mixer_options['delta'].selection_layers must start at layer {self.dense_layers} (the "
                             f"first after the dense ones), got {list(selection)}: layers before the first selection "
                             "would have no tokens to attend to")
        return ["dense" if i < self.dense_layers else "selection" if i in selection else "sparse"
                for i in range(num_layers)]


def _allowed_keys(attention_mask, B: int, T: int, S: int, device) -> torch.Tensor:
    """``[B, 1, T, S]`` bool: which cache slots each new query may attend (causal, padding), from the backbone's
    mask (4-D bool or additive float), or causal over the last ``T`` slots when it gives none."""
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 4:
        mask = attention_mask[..., -T:, :S]
        allowed = mask if mask.dtype == torch.bool else mask == 0
        return allowed.expand(B, 1, T, S)
    past = S - T
    query_position = torch.arange(T, device=device)[:, None] + past
    return (torch.arange(S, device=device)[None, :] <= query_position).expand(B, 1, T, S)


def _forced_keys(allowed: torch.Tensor, sink: int, window: int) -> torch.Tensor:
    """``allowed [..., S]`` → the first ``sink`` and the last ``window`` keys each query may attend, counted among
    its allowed keys (so left padding and packed sequences keep their own sinks and windows)."""
    rank = allowed.cumsum(-1)  # 1 for the first allowed key
    from_end = allowed.sum(-1, keepdim=True) - rank  # 0 for the last allowed key
    return allowed & ((rank <= sink) | (from_end < window))


def _masked_attention(query, key, value, keep, scaling, select: DeltaOptions | None, want_weights: bool):
    """Softmax attention over the ``keep`` keys (scores in fp32, query chunk by chunk): ``query [B, H, T, D]``,
    ``key`` / ``value [B, H, S, D]``, ``keep [B, 1, T, S]`` → (``[B, T, H, D]`` output, weights ``[B, H, T, S]`` or
    None, with ``select`` the selection ``[B, T, S]`` bool, else None)."""
    T = query.shape[2]
    outputs, selections = [], []
    chunk = T if want_weights else QUERY_CHUNK  # maps asked for: one chunk, so they are what the output used
    for start in range(0, T, chunk):
        q = query[:, :, start:start + chunk].float()
        allowed = keep[:, :, start:start + chunk]
        scores = (q @ key.float().transpose(-1, -2)) * scaling
        scores = scores.masked_fill(~allowed, float("-inf"))
        probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a query with no key (padding) attends nothing
        weights = probs.to(value.dtype)
        outputs.append(weights @ value)
        if select is not None:
            selections.append(_select(probs, allowed[:, 0], select))
    output = torch.cat(outputs, dim=2).transpose(1, 2)
    return (output, weights if want_weights else None,
            torch.cat(selections, dim=1) if select is not None else None)


def _select(probs: torch.Tensor, allowed: torch.Tensor, options: DeltaOptions):
    """``[B, C, S]`` bool: per query of the chunk, its sinks and window plus the ``token_budget`` keys with the largest
    attention summed over heads (among the allowed ones)."""
    chosen = _forced_keys(allowed, options.sink_tokens, options.window_tokens)
    salience = probs.sum(dim=1).masked_fill(~allowed | chosen, float("-inf"))  # [B, C, S]
    budget = min(options.token_budget, probs.shape[-1])
    top = salience.topk(budget, dim=-1)
    picked = torch.zeros_like(chosen).scatter(-1, top.indices, torch.isfinite(top.values))
    return chosen | picked


@register_token_mixer("delta")
class DeltaAttention(HfArchAttention):
    """Softmax attention with the source's projections (its checkpoint loads key for key); the layer's role in the
    DELTA layout decides what it attends (see the module docstring)."""

    attention_features = ()  # plain softmax attention (the paper's setting)
    options_class = DeltaOptions
    reads_token_selection = True  # the backbone hands it the latest selection layer's choice
    supports_sequence_parallel = False

    def __init__(self, config, layer_idx: int) -> None:
        super().__init__(config, layer_idx)
        self.options = mixer_options(config, "delta", DeltaOptions)
        self.role = self.options.roles(config.num_hidden_layers)[layer_idx]

    def forward(self, hidden_states, position_embeddings, attention_mask=None, past_key_values=None, cu_seqlens=None,
                output_attentions: bool = False, token_selection: torch.Tensor | None = None, **kwargs):
        if self.role == "dense":
            return super().forward(hidden_states, position_embeddings, attention_mask=attention_mask,
                                   past_key_values=past_key_values, cu_seqlens=cu_seqlens,
                                   output_attentions=output_attentions, **kwargs)
        if cu_seqlens is not None:
            raise ValueError(f"layer {self.layer_idx}: delta attention does not take packed sequences (cu_seqlens); "
                             "pad them into a batch")
        query, key, value = self.project(hidden_states)
        query, key = apply_rotary_pos_emb(query.transpose(1, 2), key.transpose(1, 2), *position_embeddings)
        value = value.transpose(1, 2)
        if past_key_values is not None:
            key, value = past_key_values.update(key, value, self.layer_idx)
        key, value = repeat_kv(key, self.num_key_value_groups), repeat_kv(value, self.num_key_value_groups)
        B, _, T, _ = query.shape
        S = key.shape[2]
        allowed = _allowed_keys(attention_mask, B, T, S, query.device)
        if self.role == "selection":
            keep, select = allowed, self.options
        else:
            if token_selection is None or token_selection.shape != (B, T, S):
                got = None if token_selection is None else tuple(token_selection.shape)
                raise ValueError(f"layer {self.layer_idx}: a sparse delta layer needs the selection of an earlier "
                                 f"selection layer of shape {(B, T, S)}, got {got}")
            keep, select = allowed & token_selection[:, None], None
        output, weights, selection = _masked_attention(query, key, value, keep, self.scaling, select,
                                                       output_attentions)
        counts = torch.stack([keep.sum(), allowed.sum()])  # keys attended, keys in the causal context
        report = {"attended_counts": counts}
        if selection is not None:
            report["token_selection"] = selection
        return mixer_result(self.finish(hidden_states, output), weights, report)


def delta_attended_share(outputs) -> float | None:
    """Share of the causal (query, key) pairs the selection and sparse layers attended in the forward that returned
    ``outputs`` (its ``attended_counts``); None without such layers. Dense layers attend everything and are not
    counted."""
    counts = getattr(outputs, "attended_counts", None)
    if not counts:
        return None
    total = torch.stack(list(counts)).sum(0)
    return float(total[0]) / max(float(total[1]), 1.0)
