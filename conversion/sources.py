"""Source adapters: map a Llama-family checkpoint's config onto the backbone's fields.

The target config is always derived from the source config (never from our defaults), so every size, RoPE setting,
bias and window of the source survives. Weights need no renaming: the backbone keeps Llama's parameter names. A
family laid out differently (Phi-3's fused projections) is first rewritten as the Llama-family model it equals
(``SourceAdapter.normalize``); every public conversion function does that through :func:`takes_source_families`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

from .phi3_source import phi3_as_mistral

# Fields copied verbatim from every Llama-family config.
_COMMON_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "hidden_act",
    "max_position_embeddings",
    "initializer_range",
    "rms_norm_eps",
    "tie_word_embeddings",
    "attention_dropout",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
)


@dataclass(frozen=True)
class SourceAdapter:
    model_type: str
    description: str
    extra_fields: Callable[[object], dict]
    normalize: Callable | None = None  # model -> the equal model of a family below (exact, checked on logits)
    moe_only: bool = False  # an MoE source: only the MoE conversion (``method="native"``) takes it

    def backbone_kwargs(self, config) -> dict:
        kwargs = {name: getattr(config, name) for name in _COMMON_FIELDS if hasattr(config, name)}
        kwargs["head_dim"] = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        rope = _rope(config)
        if rope:
            kwargs["rope_parameters"] = rope
            if all(isinstance(value, dict) for value in rope.values()):  # per layer type: kept per source layer
                kwargs["rope_layer_types"] = list(config.layer_types)
        kwargs.update(self.extra_fields(config))
        return kwargs


def _rope(config) -> dict | None:
    """The source's RoPE parameters: one dict, or one per layer type (OLMo-3, Gemma 3) where the types differ
    (collapsed to one dict where they are all the same)."""
    rope = getattr(config, "rope_parameters", None)
    if not rope:
        return None
    rope = {key: (dict(value) if isinstance(value, dict) else value) for key, value in rope.items()}
    if not all(isinstance(value, dict) for value in rope.values()):
        return rope
    if len({repr(sorted(value.items())) for value in rope.values()}) == 1:
        return next(iter(rope.values()))
    return rope


def _llama(config) -> dict:
    bias = bool(getattr(config, "attention_bias", False))
    return {"attention_bias": bias, "attention_output_bias": bias, "mlp_bias": bool(getattr(config, "mlp_bias", False))}


def _mistral(config) -> dict:
    window = getattr(config, "sliding_window", None)
    layer = "sliding_attention" if window else "full_attention"  # Mistral windows every layer when set
    return {"layer_types": [layer] * config.num_hidden_layers, "sliding_window": window}


def _layer_types_with_window(config) -> dict:
    layer_types = list(getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers)
    window = getattr(config, "sliding_window", None) if "sliding_attention" in layer_types else None
    return {"layer_types": layer_types, "sliding_window": window}


def _qwen2(config) -> dict:
    # Qwen2 hard-codes bias on q/k/v and none on o_proj.
    return {"attention_bias": True, "attention_output_bias": False, **_layer_types_with_window(config)}


def _qwen3(config) -> dict:
    bias = bool(getattr(config, "attention_bias", False))
    return {"attention_bias": bias, "attention_output_bias": bias, "qk_norm": True, **_layer_types_with_window(config)}


def _olmo2(config) -> dict:
    # OLMo-2: q/k RMSNorm over the whole projection, norms on the branches' outputs (no input norm).
    return {**_llama(config), "qk_norm": True, "qk_norm_scope": "projection", "norm_placement": "post",
            **_layer_types_with_window(config)}


def _gemma3(config) -> dict:
    # Gemma 3 (text): zero-centred (1 + w) RMSNorms around both branches, per-head q/k norms, embeddings scaled by
    # √hidden, scores by query_pre_attn_scalar^-½, GELU-tanh MLP, local / global layers with their own RoPE.
    for field in ("attn_logit_softcapping", "final_logit_softcapping"):
        if getattr(config, field, None) is not None:
            raise ValueError(f"{config.model_type} source: {field}={getattr(config, field)} is not supported")
    if getattr(config, "use_bidirectional_attention", False):
        raise ValueError(f"{config.model_type} source: use_bidirectional_attention is not a causal LM")
    return {**_llama(config), "qk_norm": True, "norm_placement": "sandwich", "norm_weight_offset": 1.0,
            "embedding_multiplier": config.hidden_size**0.5, "query_pre_attn_scalar": config.query_pre_attn_scalar,
            "hidden_act": config.hidden_activation, **_layer_types_with_window(config)}


SOURCE_ADAPTERS: dict[str, SourceAdapter] = {
    a.model_type: a
    for a in (
        SourceAdapter("llama", "Llama 1/2/3, SmolLM, TinyLlama, …", _llama),
        SourceAdapter("mistral", "Mistral (optional sliding window on every layer)", _mistral),
        SourceAdapter("qwen2", "Qwen2 / Qwen2.5 (qkv bias, optional sliding layers)", _qwen2),
        SourceAdapter("qwen3", "Qwen3 dense (q/k RMSNorm)", _qwen3),
        SourceAdapter("olmo2", "OLMo-2 (q/k RMSNorm over the whole projection, post norms)", _olmo2),
        SourceAdapter("olmo3", "OLMo-3 (OLMo-2 with sliding-window layers, RoPE per layer type)", _olmo2),
        SourceAdapter("gemma3_text", "Gemma 3 text ((1 + w) sandwich norms, q/k norm, scaled embeddings, local / "
                      "global layers with their own RoPE)", _gemma3),
        SourceAdapter("phi3", "Phi-3 (fused qkv / gate-up projections; converted as the Mistral it equals)", _mistral,
                      normalize=phi3_as_mistral),
        # Native MoE sources: --to moe --method native only (moe_import.py).
        SourceAdapter("qwen3_moe", "Qwen3-MoE (--to moe --method native)", _qwen3, moe_only=True),
        SourceAdapter("mixtral", "Mixtral (--to moe --method native)", _mistral, moe_only=True),
        SourceAdapter("qwen2_moe", "Qwen2-MoE, shared expert (--to moe --method native)", _qwen2, moe_only=True),
    )
}


def adapter_for(config) -> SourceAdapter:
    model_type = getattr(config, "model_type", None)
    if model_type in SOURCE_ADAPTERS:
        return SOURCE_ADAPTERS[model_type]
    raise ValueError(
        f"Unsupported source architecture {model_type!r} ({', '.join(getattr(config, 'architectures', None) or [])}); "
        f"supported source model types: {', '.join(sorted(SOURCE_ADAPTERS))}"
    )


def backbone_source(model, takes_moe: bool = False):
    """``model`` in a layout the conversions read (Llama parameter names): rewritten by its family's ``normalize``
    where it has one, else unchanged (an unsupported family is refused later, by :func:`adapter_for`). An MoE
    source is refused unless the conversion ``takes_moe``."""
    adapter = SOURCE_ADAPTERS.get(getattr(model.config, "model_type", None))
    if adapter is not None and adapter.moe_only and not takes_moe:
        raise ValueError(f"a {adapter.model_type} source is already a Mixture of Experts: it converts with --to moe "
                         "--method native (then anything built on hfa_moe); the other conversions need a dense source")
    return adapter.normalize(model) if adapter is not None and adapter.normalize is not None else model


def takes_source_families(convert: Callable | None = None, *, takes_moe: bool = False):
    """Decorator for a conversion ``convert(source_model, ...)``: the source goes through :func:`backbone_source`
    (``@takes_source_families``, or ``@takes_source_families(takes_moe=True)`` for the MoE conversion)."""

    def decorate(function: Callable) -> Callable:
        @functools.wraps(function)
        def wrapper(source_model, *args, **kwargs):
            return function(backbone_source(source_model, takes_moe), *args, **kwargs)

        return wrapper

    return decorate(convert) if convert is not None else decorate
