"""The token- and channel-mixer registries: every layer the backbone builds is looked up here by name.

A token mixer is a class in its own file, decorated with ``@register_token_mixer(name)``; ``config.token_mixer_types``
(or, for the built-in mixers, the flat fields: ``HfArchConfig.token_mixer_type``) picks one per layer. The class
declares what model-level code needs to know of it, as class attributes:

- ``layer_types``: transformers' layer types it sits at (its cache layer and mask kind; the first is the default);
- ``options_class``: a dataclass of its own options, built from ``config.mixer_options[name]`` (the built-in
  mixers read flat config fields);
- ``attention_features``: the softmax-attention scores / features (``attention_registry``) it builds ("all", or
  names such as ("output_gate",); none by default);
- ``attention_backends``: the ``attn_implementation`` values it runs on (None: any; (): it calls no backend);
- ``lora_targets`` / ``new_parameters``: read by ``peft_utils`` from the modules a model has;
- ``init_parameters(init)``: the initialisation of its own parameters (the one path ``_init_weights`` calls).

Its ``forward(hidden_states, position_embeddings=..., attention_mask=..., past_key_values=..., **kwargs)`` returns
``(output, attention weights or None)``, or ``(output, weights, auxiliary)`` with per-forward training terms and
measurements (``layers/auxiliary.py``: transfer / gate losses, routing probabilities); modes such as
``attention_transfer`` come in as forward arguments, and per-step state lives in its cache layer.

A channel mixer registers with ``@register_channel_mixer(name)`` and is picked by ``config.channel_mixer_types`` (or,
for the built-in ones, ``config.mlp_layer_types``); with
``routes_tokens = True`` it is called as ``mixer(x, previous_router_logits, expert_pool, token_mask)`` and returns
``(output, router logits)``, else ``mixer(x)`` returns the output — or, with ``reports_auxiliary = True`` (ACM's
compute price), ``(output, auxiliary dict)`` (``layers/auxiliary.py``). Always through ``__call__``, so forward
hooks (accelerate's, PEFT's, measurements) see every call.
"""

from __future__ import annotations

from torch import nn

from ..configuration import TokenMixerSpec, register_channel_mixer_kind, register_token_mixer_spec

__all__ = ["CHANNEL_MIXERS", "TOKEN_MIXERS", "build_channel_mixer", "build_token_mixer", "mixer_options",
           "register_channel_mixer", "register_token_mixer", "token_mixer_class"]

TOKEN_MIXERS: dict[str, type[nn.Module]] = {}
CHANNEL_MIXERS: dict[str, type[nn.Module]] = {}


def register_token_mixer(name: str):
    """Class decorator: make ``cls`` the token mixer ``token_mixer_types[i] = name`` builds, and tell the config
    which layer types it sits at, which softmax-attention features it builds and which attention backends it runs
    on."""

    def add(cls):
        layer_types = tuple(getattr(cls, "layer_types", ()))
        if not layer_types:
            raise TypeError(f"token mixer {cls.__name__} ({name!r}) must declare layer_types (the transformers layer "
                            "types it sits at, e.g. ('full_attention',) or ('linear_attention',))")
        backends = getattr(cls, "attention_backends", None)
        features = getattr(cls, "attention_features", ())
        spec = TokenMixerSpec(layer_types, attention_features=features if features == "all" else tuple(features),
                              attention_backends=None if backends is None else tuple(backends))
        register_token_mixer_spec(name, spec)
        cls.mixer_name = name
        TOKEN_MIXERS[name] = cls
        return cls

    return add


def register_channel_mixer(name: str):
    """Class decorator: make ``cls`` the channel mixer ``channel_mixer_types[i] = name`` builds (for the built-in
    "dense" / "sparse", also ``mlp_layer_types[i]``)."""

    def add(cls):
        register_channel_mixer_kind(name, "sparse" if getattr(cls, "routes_tokens", False) else "dense")
        CHANNEL_MIXERS[name] = cls
        return cls

    return add


def token_mixer_class(name: str) -> type[nn.Module]:
    if name not in TOKEN_MIXERS:
        raise ValueError(f"token mixer {name!r} is not registered; registered: {sorted(TOKEN_MIXERS)} (a mixer from "
                         "another package registers with register_token_mixer when its module is imported)")
    return TOKEN_MIXERS[name]


def mixer_options(config, name: str, options_class):
    """``options_class(**config.mixer_options[name])``, refusing unknown option names by name."""
    given = config.options_of(name)
    known = set(getattr(options_class, "__dataclass_fields__", {}))
    unknown = sorted(set(given) - known)
    if unknown:
        raise ValueError(f"{type(config).__name__}.mixer_options[{name!r}] has unknown options {unknown}; "
                         f"{options_class.__name__} takes {sorted(known)}")
    return options_class(**given)


def build_token_mixer(config, layer_idx: int) -> nn.Module:
    return token_mixer_class(config.token_mixer_type(layer_idx))(config, layer_idx)


def build_channel_mixer(config, layer_idx: int) -> nn.Module:
    name = config.channel_mixer_type(layer_idx)
    if name not in CHANNEL_MIXERS:
        raise ValueError(f"channel mixer {name!r} (layer {layer_idx}) is not registered; registered: "
                         f"{sorted(CHANNEL_MIXERS)}")
    return CHANNEL_MIXERS[name](config, layer_idx)
