"""The registries of softmax attention's parts: score functions and the features around them.

A softmax attention layer (``HfArchAttention``) is projections → features' value hooks → head placement (RoPE, or a
feature's own) → one ``attend`` (the score function's, or a feature's that replaces it) → features' output hooks →
``o_proj``. Which parts a layer gets comes from the config alone:

- a **score function** is ``config.attn_score_function``: a class registered with ``@register_attention_score(name)``
  (its config-side spec, ``AttentionScoreSpec``, says which fields only it reads and whether it runs in transformers'
  attention backends);
- a **feature** is an ``AttentionFeature`` module registered with ``@register_attention_feature(name)``, built when
  its spec's switch field is set (``AttentionFeatureSpec``: the switch, its options, the layer attribute that holds
  it, so its parameters keep their checkpoint names). Features apply in registration order.

A feature from another package declares ``spec = AttentionFeatureSpec(...)`` on its class; the built-in ones' specs
live in ``configuration.ATTENTION_FEATURE_SPECS`` so a config validates without this code.
"""

from __future__ import annotations

import torch
from torch import nn

from ..configuration import (
    ATTENTION_FEATURE_SPECS,
    ATTENTION_SCORE_SPECS,
    AttentionFeatureSpec,
    AttentionScoreSpec,
    register_attention_feature_spec,
    register_attention_score_spec,
)

__all__ = ["ATTENTION_FEATURES", "ATTENTION_SCORES", "AttentionFeature", "AttentionScore", "attention_feature_class",
           "attention_score_class",
           "register_attention_feature", "register_attention_score"]

ATTENTION_SCORES: dict[str, type] = {}
ATTENTION_FEATURES: dict[str, type] = {}


class AttentionScore:
    """A score function: turns RoPE'd ``[B, heads, T, D]`` queries, keys and values into the layer's ``[B, T, H, D]``
    output, updating the cache. Holds no parameters (its options come from the config)."""

    spec: AttentionScoreSpec | None = None

    def __init__(self, config, layer_idx: int) -> None:
        self.config = config
        self.layer_idx = layer_idx

    def attend(self, layer, hidden_states, query, key, value, *, attention_mask=None, position_embeddings=None,
               past_key_values=None, padding_mask=None, output_attentions=False, **kwargs):
        """→ (``[B, T, H, D]`` output, the ``[B, H_kv, S, D]`` values attended (the cache's included), the weight
        maps or None)."""
        raise NotImplementedError


class AttentionFeature(nn.Module):
    """A feature around the score. Every hook defaults to leaving its input as it is; a feature overrides the ones
    it needs. ``places_heads`` / ``attends``: it replaces RoPE placement / the score function (one feature each)."""

    spec: AttentionFeatureSpec | None = None
    places_heads = False
    attends = False

    def scaling(self, default: float) -> float:
        """The score's query-key scale, given the layer's ``head_dim ** -0.5``."""
        return default

    def adjust_values(self, hidden_states: torch.Tensor, value: torch.Tensor, value_bank=None) -> torch.Tensor:
        """``[B, T, H_kv, D]`` values from ``v_proj`` → the values the layer attends."""
        return value

    def place_heads(self, query, key, value, position_embeddings):
        """``[B, T, heads, D]`` q / k / v → ``[B, heads', T, D']`` with positions applied (``places_heads``)."""
        raise NotImplementedError

    def attend(self, layer, hidden_states, query, key, value, **kwargs):
        """As ``AttentionScore.attend`` (``attends``)."""
        raise NotImplementedError

    def adjust_output(self, hidden_states, attn_output, values_seen=None, padding_mask=None) -> torch.Tensor:
        """``[B, T, heads', D]`` attention output (``values_seen``: what it attended) → ``[B, T, H, D]``, before
        ``o_proj``."""
        return attn_output


def _declared_spec(cls, name: str, kind: str, built_in: dict, spec_class: type):
    """``cls.spec``, or the built-in spec registered under ``name``; refused by name when neither exists."""
    spec = cls.__dict__.get("spec") or built_in.get(name)
    if spec is None:
        raise TypeError(f"{kind} {cls.__name__} ({name!r}) must declare spec = {spec_class.__name__}(...)")
    return spec


def register_attention_score(name: str):
    """Class decorator: ``attn_score_function = name`` builds ``cls`` (its spec: ``cls.spec``, or the built-in one)."""

    def add(cls):
        spec = _declared_spec(cls, name, "attention score", ATTENTION_SCORE_SPECS, AttentionScoreSpec)
        register_attention_score_spec(name, spec)
        cls.spec = spec
        ATTENTION_SCORES[name] = cls
        return cls

    return add


def register_attention_feature(name: str):
    """Class decorator: make ``cls`` the feature a softmax attention layer builds when ``cls.spec.switch`` is set."""

    def add(cls):
        if not issubclass(cls, AttentionFeature):
            raise TypeError(f"attention feature {cls.__name__} ({name!r}) must subclass AttentionFeature")
        spec = _declared_spec(cls, name, "attention feature", ATTENTION_FEATURE_SPECS, AttentionFeatureSpec)
        register_attention_feature_spec(name, spec)
        cls.spec = spec
        ATTENTION_FEATURES[name] = cls
        return cls

    return add


def attention_score_class(name: str) -> type:
    if name not in ATTENTION_SCORES:
        raise ValueError(f"attn_score_function {name!r} is not registered; registered: {sorted(ATTENTION_SCORES)} "
                         "(a score from another package registers when its module is imported)")
    return ATTENTION_SCORES[name]


def attention_feature_class(name: str) -> type:
    if name not in ATTENTION_FEATURES:
        raise ValueError(f"attention feature {name!r} is switched on by the config but not registered; registered: "
                         f"{sorted(ATTENTION_FEATURES)} (a feature from another package registers when its module is "
                         "imported)")
    return ATTENTION_FEATURES[name]
