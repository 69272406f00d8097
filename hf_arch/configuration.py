"""The backbone's configuration: one decoder whose per-layer mixers come from the config.

Every variant is a subclass with its own ``model_type`` (prefix ``hfa_``) and defaults. The fields here are the
Llama-family ones (so a Llama/Mistral/Qwen2/Qwen3 config maps onto them field by field) plus the options of the
mixers the backbone knows. Each mixer reads only its own slice (``attn_output_gate*`` for the output gate, …), and a
config refuses a field of a mechanism it leaves off unless the field keeps its default (``_MECHANISM_OPTIONS``).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math

try:  # transformers >= 5 renamed the base class; keep the old name working for remote-code users.
    from transformers import PreTrainedConfig
except ImportError:  # pragma: no cover
    from transformers import PretrainedConfig as PreTrainedConfig

# Token-mixer layer types this backbone builds (transformers' own names, so DynamicCache(config=...) understands them).
# "hybrid_sliding" is transformers' name for a layer holding a linear-attention state plus a sliding-window KV cache:
# a linear layer with an intra-layer window branch (linear_attn_hybrid = liger | lizard | lolcats); "hybrid" one
# holding a linear-attention state plus every key and value (STILL: salient tokens of the whole past stay softmax).
ATTENTION_LAYER_TYPES = ("full_attention", "sliding_attention")
LINEAR_LAYER_TYPES = ("linear_attention", "hybrid_sliding", "hybrid")
SUPPORTED_LAYER_TYPES = ATTENTION_LAYER_TYPES + LINEAR_LAYER_TYPES


@dataclasses.dataclass(frozen=True)
class TokenMixerSpec:
    """What the config needs to know of a token mixer (the class lives under ``layers/``, where
    ``@register_token_mixer`` also registers this): the transformers layer types (cache and mask kinds) it can sit
    at, the first being the one a layout given only as ``token_mixer_types`` gets; the softmax-attention features
    it builds (``ATTENTION_FEATURE_SPECS`` names, "score_function" for a score other than softmax; "all": every one
    registered); and the attention backends it runs on (None: any of transformers'; () for mixers that call no
    backend). A new mixer keeps its own options in ``config.mixer_options[name]``."""

    layer_types: tuple[str, ...]
    attention_features: tuple[str, ...] | str = ()
    attention_backends: tuple[str, ...] | None = None

    def builds_feature(self, name: str) -> bool:
        return self.attention_features == "all" or name in self.attention_features


# The built-in token mixers (a config must validate without the modeling code, e.g. as remote code); more register
# here. A config without ``token_mixer_types`` picks among these from its flat fields (``token_mixer_type``).
TOKEN_MIXER_SPECS: dict[str, TokenMixerSpec] = {
    "attention": TokenMixerSpec(ATTENTION_LAYER_TYPES, attention_features="all"),
    "sparse_attention": TokenMixerSpec(("full_attention",), attention_features=("output_gate",)),
    "gla": TokenMixerSpec(LINEAR_LAYER_TYPES, attention_backends=()),
    "gated_deltanet": TokenMixerSpec(LINEAR_LAYER_TYPES, attention_backends=()),
}


@dataclasses.dataclass(frozen=True)
class AttentionScoreSpec:
    """A score function of softmax attention layers (``attn_score_function``; the op lives in
    ``layers/attention_scores``): the fields only it reads, and whether it runs in transformers' attention backends
    (else in our own ops, which read the 2-D padding mask and keep the flash / flex kernels out)."""

    options: tuple[str, ...] = ()
    in_backend: bool = False
    description: str = ""


@dataclasses.dataclass(frozen=True)
class AttentionFeatureSpec:
    """A feature softmax attention layers add around the score (the module lives in ``layers/``, registered with
    ``@register_attention_feature``; the layer holds it as ``attribute``): the flat config field that turns it on and
    its off value, the fields only it reads, whether it reads the 2-D padding mask, why transformers' flash / flex
    kernels cannot run it (None: they can), and whether it combines with a score other than softmax."""

    attribute: str
    switch: str
    off: object
    options: tuple[str, ...] = ()
    description: str = ""
    needs_padding_mask: bool = False
    kernel_conflict: str | None = None
    any_score: bool = True

    def is_on(self, config) -> bool:
        return not _same_value(getattr(config, self.switch, self.off), self.off)


# Built in (validated without the modeling code); more register here. The order is the order a layer applies them in.
ATTENTION_SCORE_SPECS: dict[str, AttentionScoreSpec] = {
    "softmax": AttentionScoreSpec(in_backend=True),
    "sa_softmax": AttentionScoreSpec(description="Self-Adjust Softmax"),
    "sa_softmax_normalized": AttentionScoreSpec(description="Self-Adjust Softmax (normalized)"),
    "krr": AttentionScoreSpec(("krr_ridge", "krr_temperature", "krr_value_range"),
                              description="Cubit's kernel ridge regression (attn_score_function='krr')"),
}
ATTENTION_FEATURE_SPECS: dict[str, AttentionFeatureSpec] = {
    "value_bank": AttentionFeatureSpec("value_gate", "move_num_slots", 0, ("move_init",),
                                       "a MoVE value bank (move_num_slots > 0)"),
    "simulated_heads": AttentionFeatureSpec(
        "simulated", "sas_num_heads", 0, ("sas_qk_dim",), "Simulated Attention Score (sas_num_heads > 0)",
        kernel_conflict="Simulated Attention Score: the simulated queries / keys are wider than the values",
        any_score=False),
    "differential": AttentionFeatureSpec(
        "differential", "diff_attn_noise_heads", 0, ("diff_attn_lambda_init", "diff_attn_head_norm"),
        "Grouped Differential Attention (diff_attn_noise_heads > 0)",
        kernel_conflict="Grouped Differential Attention: the noise call reads values wider than its keys, a group's "
                        "values side by side", any_score=False),
    "affine": AttentionFeatureSpec("affine", "attn_affine", False, ("attn_affine_init",),
                                   "affine-scaled attention (attn_affine=True)", needs_padding_mask=True),
    "output_gate": AttentionFeatureSpec(
        "output_gate", "attn_output_gate", None,
        ("attn_output_gate_bias", "attn_output_gate_rank", "attn_output_gate_scale", "attn_output_gate_init",
         "attn_output_gate_lr_scale"), "the attention output gate (attn_output_gate set)"),
}


def register_attention_score_spec(name: str, spec: AttentionScoreSpec) -> None:
    known = ATTENTION_SCORE_SPECS.get(name)
    if known is not None and known != spec:
        raise ValueError(f"attention score {name!r} is already registered with {known}, not {spec}")
    ATTENTION_SCORE_SPECS[name] = spec


def register_attention_feature_spec(name: str, spec: AttentionFeatureSpec) -> None:
    known = ATTENTION_FEATURE_SPECS.get(name)
    if known is not None and known != spec:
        raise ValueError(f"attention feature {name!r} is already registered with {known}, not {spec}")
    taken = {s.attribute: n for n, s in ATTENTION_FEATURE_SPECS.items() if n != name}
    if spec.attribute in taken:
        raise ValueError(f"attention feature {name!r}: attribute {spec.attribute!r} is {taken[spec.attribute]!r}'s")
    ATTENTION_FEATURE_SPECS[name] = spec


# Channel mixers by name, with the ``mlp_layer_types`` entry (transformers' "dense" / "sparse") a layer of it gets: the
# dense SwiGLU MLP, or a Mixture-of-Experts layer (``moe_*`` fields); more register here.
CHANNEL_MIXER_KINDS: dict[str, str] = {"dense": "dense", "sparse": "sparse"}


def register_token_mixer_spec(name: str, spec: TokenMixerSpec) -> None:
    known = TOKEN_MIXER_SPECS.get(name)
    if known is not None and known != spec:
        raise ValueError(f"token mixer {name!r} is already registered with {known}, not {spec}")
    bad = sorted(set(spec.layer_types) - set(SUPPORTED_LAYER_TYPES))
    if not spec.layer_types or bad:
        raise ValueError(f"token mixer {name!r}: layer_types must be a non-empty subset of {SUPPORTED_LAYER_TYPES} "
                         f"(transformers' cache layer kinds), got {spec.layer_types}")
    TOKEN_MIXER_SPECS[name] = spec


def register_channel_mixer_kind(name: str, mlp_layer_type: str) -> None:
    known = CHANNEL_MIXER_KINDS.get(name)
    if known is not None and known != mlp_layer_type:
        raise ValueError(f"channel mixer {name!r} is already registered as {known!r}, not {mlp_layer_type!r}")
    CHANNEL_MIXER_KINDS[name] = mlp_layer_type


@dataclasses.dataclass(frozen=True)
class MoERouterSpec:
    """What the config needs to know of a router (the class itself lives in ``layers/moe_routers``, where
    ``@register_moe_router`` also registers this): the config fields only it reads, and whether it picks a fixed
    ``num_experts_per_tok`` experts per token."""

    options: tuple[str, ...] = ()
    fixed_top_k: bool = True
    # False: the router has no learned assignment to balance (THOR's random experts), so a load-balance loss would be
    # a constant and is refused by name.
    balance_loss: bool = True
    # True: num_experts_per_tok caps a per-token number of experts (DynaMoE) instead of being unused.
    caps_top_k: bool = False


# The built-in routers (a config must validate without the modeling code, e.g. as remote code); more register here.
MOE_ROUTER_SPECS: dict[str, MoERouterSpec] = {
    "softmax_topk": MoERouterSpec(("moe_norm_topk_prob",)),
    "sigmoid_topk": MoERouterSpec(("moe_norm_topk_prob",)),
    "relu_rmsnorm": MoERouterSpec(fixed_top_k=False),
    "norm_router": MoERouterSpec(("moe_norm_topk_prob", "moe_norm_router_scale")),
    "tempered_topk": MoERouterSpec(),
    "sinkhorn": MoERouterSpec(("moe_norm_topk_prob", "moe_sinkhorn_iterations", "moe_sinkhorn_imbalance")),
    "stochastic": MoERouterSpec(("moe_consistency_coef",), balance_loss=False),
    "activation_dense_to_sparse": MoERouterSpec(
        ("moe_router_activation", "moe_router_temperature", "moe_router_threshold"), fixed_top_k=False),
    "sqrt_gate": MoERouterSpec(),
    "dynamic_topk": MoERouterSpec(("moe_norm_topk_prob", "moe_dynamic_k", "moe_dynamic_threshold"),
                                  fixed_top_k=False, caps_top_k=True),
    "pre_gated": MoERouterSpec(("moe_pre_gate_hidden",)),
}
MOE_ROUTER_ACTIVATIONS = ("relu", "gelu", "silu", "tanh", "identity")
MOE_DYNAMIC_K_RULES = ("threshold", "complexity")
# DynaMoE's per-layer expert capacity across the sparse layers (from num_experts_per_tok down to moe_capacity_min).
MOE_CAPACITY_SCHEDULES = ("uniform", "descending", "ascending", "pyramid", "wave")


def moe_layer_capacity(config, sparse_index: int) -> int:
    """Experts per token of the ``sparse_index``-th sparse layer (0-based, counting sparse layers only) under
    ``config.moe_capacity_schedule``: between ``moe_capacity_min`` and ``num_experts_per_tok`` (the top-k of a fixed-k
    router, the cap of a per-token one). ``pyramid`` peaks in the middle layers; ``wave`` runs two cosine periods,
    low at both ends and in the middle."""
    high = config.num_experts_per_tok
    schedule = getattr(config, "moe_capacity_schedule", "uniform")
    if schedule == "uniform":
        return high
    low = config.moe_capacity_min
    count = sum(kind == "sparse" for kind in config.mlp_layer_types)
    t = sparse_index / (count - 1) if count > 1 else 0.0
    share = {"descending": 1.0 - t, "ascending": t, "pyramid": 1.0 - abs(2.0 * t - 1.0),
             "wave": (1.0 - math.cos(4.0 * math.pi * t)) / 2.0}[schedule]
    return int(min(high, max(low, math.floor(low + (high - low) * share + 0.5))))


def moe_sparse_index(config, layer_idx: int) -> int:
    """How many sparse layers come before layer ``layer_idx``."""
    return sum(kind == "sparse" for kind in config.mlp_layer_types[:layer_idx])


def register_moe_router_spec(name: str, spec: MoERouterSpec) -> None:
    known = MOE_ROUTER_SPECS.get(name)
    if known is not None and known != spec:
        raise ValueError(f"moe_router {name!r} is already registered with {known}, not {spec}")
    MOE_ROUTER_SPECS[name] = spec


def _router_reads(field: str):
    return lambda c: field in MOE_ROUTER_SPECS.get(c.moe_router, MoERouterSpec()).options


MOE_EXPERT_POOLS = ("per_layer", "global")
MOE_BALANCE_SCOPES = ("layer", "pool")
OUTPUT_GATE_GRANULARITIES = ("headwise", "elementwise")
OUTPUT_GATE_INITS = ("normal", "zeros")
# Fields earlier releases saved that nothing ever read (the chunked kernels pick their own chunk; the output gate is
# always a sigmoid): dropped on load, so old config.json files keep loading and are not carried forward.
RETIRED_FIELDS = ("linear_attn_chunk_size", "attn_output_gate_activation")
LINEAR_ATTN_TYPES = ("gla", "gated_deltanet")
RESIDUAL_UPDATES = ("additive", "geodesic")
SPARSE_ATTN_METHODS = ("seer", "flux")
SPARSE_ATTN_SELECTIONS = ("threshold", "topk", "budget")
LINEAR_ATTN_GATES = ("low_rank", "scalar", "key_pooled", "none")
LINEAR_ATTN_FEATURE_MAPS = ("identity", "softmax", "hedgehog", "norm_aware", "np_map")
LINEAR_ATTN_OUTPUT_NORMS = ("gated_rmsnorm", "rmsnorm", "none")
LINEAR_ATTN_QK_NORMS = ("none", "l2")
QK_NORM_SCOPES = ("head", "projection")
NORM_PLACEMENTS = ("pre", "post", "sandwich")
LINEAR_ATTN_HYBRIDS = ("none", "liger", "lizard", "lolcats", "still")


# Options that only matter while their mechanism is on: (the mechanism, is it on?, the fields only it reads). A config
# that leaves a mechanism off must leave those fields at their defaults (the config class's own defaults, e.g.
# GatedDeltaNetConfig's conv size), so an option of a mechanism the model does not build (another variant's, say) is
# refused instead of silently ignored. Saved configs hold every field at its default, so they keep loading.
# The attention scores' and features' options come from their specs (``_mechanism_options``).
_MECHANISM_OPTIONS: tuple[tuple[str, object, tuple[str, ...]], ...] = (
    ("a gate bias (attn_output_gate_bias=True)", lambda c: c.attn_output_gate is not None and c.attn_output_gate_bias,
     ("attn_output_gate_bias_init",)),
    ("GeoNorm (residual_update='geodesic')", lambda c: c.residual_update == "geodesic",
     ("geonorm_step_init", "geonorm_layer_decay")),
    ("learned sparse attention (sparse_attn_method set)", lambda c: c.sparse_attn_method is not None,
     ("sparse_attn_block_size",)),
    ("SeerAttention block gates (sparse_attn_method='seer')", lambda c: c.sparse_attn_method == "seer",
     ("sparse_attn_gate_dim", "sparse_attn_selection", "sparse_attn_threshold", "sparse_attn_topk",
      "sparse_attn_token_budget")),
    ("Flux layer routers (sparse_attn_method='flux')", lambda c: c.sparse_attn_method == "flux",
     ("sparse_attn_router_hidden", "sparse_attn_router_bias", "sparse_attn_sink_blocks", "sparse_attn_window_blocks",
      "sparse_attn_gumbel_tau", "sparse_attn_target_sparsity", "sparse_attn_lagrangian_lr_scale")),
    # sliding_window is not here: it is a field of transformers' own configs (Mistral, Qwen2 carry it with the window
    # off), which converted sources and transformers' common model tests set on any config that has it.
    ("GLA / Gated DeltaNet layers (token mixers 'gla' / 'gated_deltanet')",
     lambda c: bool({"gla", "gated_deltanet"} & c.token_mixer_names()),
     ("linear_attn_type", "linear_attn_gate", "linear_attn_gate_low_rank_dim", "linear_attn_gate_normalizer",
      "linear_attn_conv_size", "linear_attn_qk_norm", "linear_attn_output_norm", "linear_attn_use_rope",
      "linear_attn_hybrid", "linear_attn_mix_weights", "linear_attn_num_sinks",
      "linear_attn_feature_map", "linear_attn_normalize", "linear_attn_selection_block",
      "linear_attn_selection_topk")),
    ("STILL's token selection (linear_attn_hybrid='still')", lambda c: c.linear_attn_hybrid == "still",
     ("linear_attn_selection_block", "linear_attn_selection_topk")),
    ("an intra-layer hybrid (linear_attn_hybrid 'liger', 'lizard', 'lolcats' or 'still')", lambda c: c.linear_attn_hybrid != "none",
     ("linear_attn_mix_weights",)),
    ("GLA's low-rank forget gate (linear_attn_type='gla' with linear_attn_gate='low_rank')",
     lambda c: c.linear_attn_type == "gla" and c.linear_attn_gate == "low_rank", ("linear_attn_gate_low_rank_dim",)),
    ("a GLA or key-pooled forget gate (linear_attn_type='gla' with a gate, or linear_attn_gate='key_pooled')",
     lambda c: (c.linear_attn_type == "gla" and c.linear_attn_gate != "none") or c.linear_attn_gate == "key_pooled",
     ("linear_attn_gate_normalizer",)),
    ("Mixture-of-Experts layers ('sparse' in mlp_layer_types)", lambda c: "sparse" in c.mlp_layer_types,
     ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "num_shared_experts",
      "shared_expert_intermediate_size", "shared_expert_gate", "moe_router", "moe_norm_topk_prob", "moe_routed_scale",
      "moe_norm_router_scale", "moe_zero_experts", "moe_copy_experts", "moe_constant_experts", "moe_gating_residual",
      "moe_router_bias", "moe_expert_pool", "moe_pool_size", "moe_load_balance_coef", "moe_load_balance_scope",
      "moe_zc_balance_weight", "moe_z_loss_coef", "moe_tls_coef", "moe_cls_coef", "moe_cls_chunk_size",
      "output_router_logits", "moe_sinkhorn_iterations", "moe_sinkhorn_imbalance", "moe_consistency_coef",
      "moe_router_activation", "moe_router_temperature", "moe_router_threshold", "moe_dynamic_k",
      "moe_dynamic_threshold", "moe_capacity_schedule", "moe_capacity_min", "moe_pre_gate_hidden")),
    ("a shared expert (num_shared_experts > 0)", lambda c: c.num_shared_experts > 0,
     ("shared_expert_intermediate_size", "shared_expert_gate")),
    ("a router that reads moe_norm_topk_prob (the top-k routers in MOE_ROUTER_SPECS)",
     _router_reads("moe_norm_topk_prob"), ("moe_norm_topk_prob",)),
    ("a global expert pool (moe_expert_pool='global')", lambda c: c.moe_expert_pool == "global", ("moe_pool_size",)),
    ("zero-computation experts (moe_zero_experts / moe_copy_experts / moe_constant_experts > 0)",
     lambda c: c.num_zero_computation_experts > 0, ("moe_zc_balance_weight",)),
    ("a per-layer expert capacity schedule (moe_capacity_schedule other than 'uniform')",
     lambda c: c.moe_capacity_schedule != "uniform", ("moe_capacity_min",)),
)


# What a config builds, read through this module's spec tables. Modeling code calls these functions, not the config's
# methods: a checkpoint's remote code loads its configuration file twice (transformers gives the config file and the
# modeling file each their own copy), and only the modeling file's copy sees the parts another package registers.
def attention_features_on(config) -> list[tuple[str, AttentionFeatureSpec]]:
    """The registered softmax-attention features ``config`` switches on, in the order layers apply them."""
    return [(name, spec) for name, spec in ATTENTION_FEATURE_SPECS.items() if spec.is_on(config)]


def _score_spec(config) -> AttentionScoreSpec:
    return ATTENTION_SCORE_SPECS.get(config.attn_score_function, AttentionScoreSpec(in_backend=True))


def attention_needs_padding_mask(config) -> bool:
    """Mixers that read the 2-D padding mask themselves (sparse prefill, our score ops, affine value means)."""
    return (config.sparse_attn_method is not None or not _score_spec(config).in_backend
            or any(spec.needs_padding_mask for _, spec in attention_features_on(config)))


def attention_kernel_conflicts(config) -> list[str]:
    """What ``config`` builds that transformers' flash / flex attention kernels cannot run, one line each (empty:
    they can). The models read their ``_supports_flash_attn`` / ``_supports_flex_attn`` from it."""
    conflicts = []
    for name in sorted(config.token_mixer_names()):
        backends = TOKEN_MIXER_SPECS[name].attention_backends if name in TOKEN_MIXER_SPECS else None
        if backends:  # () calls no backend: nothing to conflict with
            conflicts.append(f"token mixer {name!r} runs on the {', '.join(backends)} attention backends only")
    score = _score_spec(config)
    if not score.in_backend:
        conflicts.append(f"attn_score_function={config.attn_score_function!r} ({score.description or 'its scores'} "
                         "run in the package's own ops, not in an attention backend)")
    for _, spec in attention_features_on(config):
        if spec.kernel_conflict:
            conflicts.append(f"{spec.switch}={getattr(config, spec.switch)!r} ({spec.kernel_conflict})")
    return conflicts


def _registered_part_fields() -> list[str]:
    """The config fields the registered attention scores and features read (switches and options)."""
    fields = [f for spec in ATTENTION_SCORE_SPECS.values() for f in spec.options]
    fields += [f for spec in ATTENTION_FEATURE_SPECS.values() for f in (spec.switch, *spec.options)]
    return fields


def _mechanism_options():
    """``_MECHANISM_OPTIONS`` plus, per registered attention score and feature, (what it is, is it on?, its fields)."""
    for name, spec in ATTENTION_SCORE_SPECS.items():
        if spec.options:
            yield spec.description or f"attn_score_function={name!r}", \
                (lambda c, name=name: c.attn_score_function == name), spec.options
    for spec in ATTENTION_FEATURE_SPECS.values():
        if spec.options:
            yield spec.description or f"{spec.switch} set", spec.is_on, spec.options
    yield from _MECHANISM_OPTIONS
    yield from _router_options()


def _router_options():
    """Per option a registered MoE router reads (beyond the top-k routers' shared ``moe_norm_topk_prob``): (the
    routers that read it, is one of them chosen?, the field)."""
    for name in sorted({f for spec in MOE_ROUTER_SPECS.values() for f in spec.options} - {"moe_norm_topk_prob"}):
        readers = sorted(router for router, spec in MOE_ROUTER_SPECS.items() if name in spec.options)
        yield f"moe_router {' / '.join(map(repr, readers))}", _router_reads(name), (name,)


ROPE_LAYER_TYPES = ("full_attention", "sliding_attention")


def rope_per_layer_type(rope_parameters) -> dict:
    """``{layer type: parameters}`` when ``rope_parameters`` holds one dict per layer type (transformers' nested
    form), else ``{}``. Flat keys beside them are ignored: transformers releases before 5.25 do not know the nested
    form for our configs and add a flat ``rope_theta`` / ``rope_type`` next to it."""
    if not rope_parameters:
        return {}
    return {key: value for key, value in rope_parameters.items() if key in ROPE_LAYER_TYPES and isinstance(value, dict)}


class HfArchConfig(PreTrainedConfig):
    r"""Configuration of the hf-arch decoder backbone.

    Args (beyond the usual Llama fields):
        attention_output_bias: bias on ``o_proj`` (Llama ties it to ``attention_bias``; Qwen2 has qkv bias only).
        qk_norm: RMSNorm on queries and keys before RoPE (Qwen3, OLMo-2).
        qk_norm_scope: what that RMSNorm spans: ``"head"`` (each head's ``head_dim``, Qwen3) or ``"projection"``
            (the whole q / k projection, all heads at once, OLMo-2).
        norm_weight_offset: RMSNorm scales are ``norm_weight_offset + weight`` (Gemma's zero-centred norms: 1.0).
        embedding_multiplier: token embeddings are multiplied by it (Gemma: ``√hidden_size``); None: not scaled.
        query_pre_attn_scalar: softmax attention scales scores by ``query_pre_attn_scalar ** -0.5`` (Gemma); None:
            ``head_dim ** -0.5``.
        rope_parameters: one dict for every layer, or one per layer type (``{"sliding_attention": {...},
            "full_attention": {...}}``, Gemma 3 / OLMo-3; linear layers take the ``full_attention`` one).
        rope_layer_types: with RoPE per layer type, the type whose RoPE each layer takes (None: its own layer type;
            a linearized model keeps its source layers' types here).
        norm_placement: where each block's RMSNorms sit: ``"pre"`` (Llama: before the mixer and before the MLP),
            ``"post"`` (OLMo-2: on the mixer's and the MLP's outputs, before the residual add) or ``"sandwich"``
            (Gemma 2/3: both). Parameter names follow those families' checkpoints.
        layer_types: one token-mixer type per layer (``full_attention`` | ``sliding_attention``).
        mlp_layer_types: one channel-mixer type per layer: ``dense`` (SwiGLU MLP) or ``sparse`` (Mixture of Experts).
        sliding_window: window size for ``sliding_attention`` layers.
        attn_output_gate: ``None`` (no gate), ``"headwise"`` (one scalar per head) or ``"elementwise"`` (one per
            channel): the query-dependent gate ``o = s·act(x W_g) ⊙ SDPA(q, k, v)`` applied before ``o_proj``
            (position G1 of Qiu et al.). ``x`` is the layer's normed input.
        attn_output_gate_bias: bias on the gate projection.
        attn_output_gate_rank: low-rank gate projection ``x → r → gate`` (``None`` for full rank).
        attn_output_gate_scale: ``s`` above. ``2.0`` with a zero-initialised projection makes the gate exactly 1
            (``2·σ(0)``), which is what conversions use to keep the source model's function.
        attn_output_gate_init: ``"normal"`` (from scratch, ``initializer_range``) or ``"zeros"`` (identity-like).
        attn_output_gate_bias_init: initial value of the gate bias.
        attn_score_function: ``"softmax"``, or Self-Adjust Softmax ``"sa_softmax"`` (weights ``x·softmax(x)``) /
            ``"sa_softmax_normalized"`` (``(x − min(x_min,0)) / (max(0,x_max) − min(x_min,0)) · softmax(x)``), run by
            ``kernels.ops.sa_softmax_attention`` instead of the attention backend; or Cubit's kernel ridge regression
            ``"krr"``: ``O = κ(Q,K)(κ(K,K) + λI)⁻¹ V`` over the causal prefix (``kernels.ops.krr_attention``, O(T³) per
            head) with ``κ(a,b) = exp(τ(â·b̂ − 1))``, ``λ = krr_ridge > 0``, ``τ = krr_temperature`` and values first
            kept within ``±krr_value_range`` by ``r·tanh(v/r)`` (Limited-Range Rescale; ``None`` = off).
        attn_affine: affine-scaled attention ``(α(x)·softmax + β(x)) V`` per head and query (see
            ``layers/affine_attention.py``); ``attn_affine_init`` ``"identity"`` (α=1, β=0: exact insertion into a
            checkpoint) or ``"normal"``.
        move_num_slots: MoVE value-embedding bank size (0 = no bank): ``v' = W_v x + s(x)·Σ_j softmax(x W_r)_j e_j`` in
            every attention layer, one bank on the model (``layers/value_bank.py``); ``move_init`` ``"identity"``
            (``s = 0``: exact insertion into a checkpoint) or ``"normal"``.
        diff_attn_noise_heads: Grouped Differential Attention (0 = off): each of the ``num_attention_heads`` signal
            heads subtracts ``λ_h`` times a noise map; ``diff_attn_noise_heads`` noise maps (own q/k projections) are
            shared GQA-style by ``num_attention_heads / diff_attn_noise_heads`` signal heads each, so it must divide
            ``num_attention_heads``. ``diff_attn_lambda_init``: initial λ (``None``: DIFF Transformer's depth
            schedule ``0.8 − 0.6·exp(−0.3·layer)``). ``diff_attn_head_norm``: DIFF's per-head RMSNorm and
            ``(1 − λ_init)`` factor on the difference (``False``: the plain difference; trains much faster in our
            small from-scratch runs, see the README). See ``layers/differential_attention.py``.
        sas_num_heads: Simulated Attention Score (0 = off): attention runs on ``sas_num_heads`` simulated heads
            (a multiple of ``num_attention_heads``) of query/key width ``sas_qk_dim`` (default ``2·head_dim``),
            projected from the real heads, and Parameter-Efficient Attention Aggregation maps them back to
            ``num_attention_heads`` before ``o_proj``. See ``layers/simulated_attention.py``.
        residual_update: ``"additive"`` (pre-norm ``h + f(norm(h))``) or GeoNorm's ``"geodesic"``: the hidden state
            lives on the sphere of radius √hidden and each branch output moves it along a geodesic, by an angle
            ``step_l · rms(tangent part)`` with ``step_l`` learned and initialised to ``geonorm_step_init ·
            geonorm_layer_decay^l`` (the layer-wise update decay). See ``layers/geonorm.py``.
        attn_output_gate_lr_scale: learning-rate multiplier the recipes apply to gate parameters (retrofitted gates
            barely move at the base LR, as the Gated Attention authors report).

    Linear-attention layers (``linear_attention`` / ``hybrid_sliding`` in ``layer_types``) read the ``linear_attn_*``
    fields. They keep the attention layer's ``q/k/v/o_proj`` shapes (``num_attention_heads`` query heads,
    ``num_key_value_heads`` key/value heads repeated to the query heads, ``head_dim``), so a softmax layer's weights
    map onto them key for key.
        linear_attn_type: ``"gla"`` (per-key-channel forget gate) or ``"gated_deltanet"`` (delta rule, scalar decay
            ``-exp(A_log)·softplus(a + dt_bias)`` and write strength ``β = σ(b)`` per head).
        linear_attn_gate: GLA gate form: ``"low_rank"`` (``x → r → H·D``, the GLA paper) or ``"scalar"`` (one value
            per head and token, Lizard's σ(W_γ x)); log gate ``= logsigmoid(·) / linear_attn_gate_normalizer``.
            ``"key_pooled"`` (Liger, no parameters): GLA log gate ``logsigmoid(k) / normalizer`` per key channel from
            the raw ``k_proj`` output (before conv, norm, RoPE and feature map); Gated DeltaNet: per-head decay
            ``logsigmoid(mean_D k) / normalizer`` (β still from its projection). ``"none"``: no decay (plain
            linear attention, LoLCATs). For Gated DeltaNet, ``low_rank`` / ``scalar`` mean its Mamba-2 decay.
        linear_attn_feature_map: φ on the linear branch's q and k (the window branch keeps raw q/k):
            ``"identity"``; ``"softmax"`` over the head dim (Liger, no parameters); ``"hedgehog"`` (LoLCATs:
            ``[softmax(x W_h) ⊕ softmax(-x W_h)]`` with a learnable ``W_h`` per head, identity at init,
            ``q_feature_map [H, D, D]`` and ``k_feature_map [H_kv, D, D]``; the feature dim becomes 2D);
            ``"norm_aware"`` (NaLaFormer, no parameters: the query's direction split by sign and raised to a power
            that grows with its norm, ``p = 3(½ + tanh‖q‖)``, so a longer query attends more sharply; the key cubed and
            split by sign, so only same-sign dimensions interact; the feature dim becomes 2D; GLA / Gated DeltaNet);
            ``"np_map"`` (STILL's norm-preserved map: the direction of Hedgehog's learnable map, the magnitude of
            the pretrained q / k, ``‖x‖ · h(x) / ‖h(x)‖``, so training the map cannot drift the feature norms the
            source's attention depended on; same parameters and 2D features as ``hedgehog``).
        linear_attn_normalize: normalised linear branch ``φ(q)S_t / (φ(q)·z_t)`` with ``z_t = Σ decay·φ(k)``
            (LoLCATs / Hedgehog); GLA only, needs a positive feature map (``softmax`` / ``hedgehog``).
        linear_attn_gate_low_rank_dim: ``r`` above. linear_attn_gate_normalizer: the GLA paper's τ (16).
        linear_attn_conv_size: depthwise causal short-conv width over q, k, v (0 = none), SiLU after it.
        linear_attn_qk_norm: ``"l2"`` normalises q and k per head (Gated DeltaNet); ``"none"``.
        linear_attn_output_norm: ``"gated_rmsnorm"`` (``RMSNorm(o) · SiLU(x W)``, per head), ``"rmsnorm"``, ``"none"``.
        linear_attn_use_rope: rotate q/k of the linear branch (off by default: the decay carries position).
            ``rope_parameters`` are read by attention layers, by linear layers with ``linear_attn_use_rope`` or an
            intra-layer hybrid, and by attention transfer's softmax teacher (a converted layer's source attention):
            an all-linear model keeps them for that teacher, so they are not refused there.
        linear_attn_hybrid: intra-layer hybrid: ``"none"``; ``"liger"`` (``w_lin·linear + w_win·SWA`` with the same
            q/k/v); ``"lizard"`` (SWA with ``linear_attn_num_sinks`` learnable sink logits, ``linear + α·SWA`` with α
            learnable); ``"lolcats"`` (LoLCATs: one softmax denominator shared by the window's ``exp(q·k/√d - max)``
            terms, weighted by a learnable per-head γ = sigmoid(·), and the linear branch's ``w_lin·φ(q)·φ(k)`` terms
            over the keys older than the window; needs ``linear_attn_normalize``; exact softmax attention while the
            window holds every key); ``"still"`` (STILL: LoLCATs' shared denominator, and beyond the window the
            ``linear_attn_selection_topk`` most self-salient tokens of every ``linear_attn_selection_block`` positions
            stay softmax keys for good while the rest enter the linear state; self-saliency = a token's
            log-probability of itself in its own window row, averaged over each key head's query heads; selection is
            made once a block is complete, which is before its tokens leave the window). The window is
            ``sliding_window``; such layers are stored as ``hybrid_sliding`` (``hybrid`` for STILL: every key kept).
        linear_attn_selection_block / linear_attn_selection_topk: STILL's block of positions (<= sliding_window) and
            tokens kept per block and key head (0 <= topk <= block).
        linear_attn_mix_weights: ``[w_lin, w_win]`` (``w_win`` is α's initial value for lizard, γ's for lolcats).
        linear_attn_num_sinks: learnable sink logits in the window branch's softmax denominator.
        full_attention_layers / linear_to_full_ratio: shorthands for ``layer_types`` of a linear variant: the listed
            layers (or every ``(ratio + 1)``-th layer) get full attention, the rest linear attention.

    Mixture-of-Experts layers (``sparse`` in ``mlp_layer_types``) read the ``moe_*`` fields and these:
        moe_sparse_step: shorthand for ``mlp_layer_types``: every ``step``-th layer (1-based) is sparse.
        num_experts: FFN experts per layer (``per_layer`` pool). num_experts_per_tok: top-k over all routed experts
            (FFN and zero-computation); ignored by ``relu_rmsnorm``, whose number of active experts varies.
        moe_intermediate_size: each FFN expert's SwiGLU width (default ``intermediate_size``).
        num_shared_experts / shared_expert_intermediate_size: an always-on dense expert (Qwen/DeepSeek style) of
            width ``shared_expert_intermediate_size`` (default ``num_shared_experts · moe_intermediate_size``);
            ``shared_expert_gate`` scales it by ``σ(x w)`` (Qwen2-MoE).
        moe_router: ``softmax_topk`` (softmax over all routed experts, top-k; ``moe_norm_topk_prob`` renormalises
            the k weights), ``sigmoid_topk`` (independent sigmoids, top-k), ``relu_rmsnorm`` (BlockFFN:
            ``RMSNorm(ReLU(x W))`` over experts, every positive expert is active), ``norm_router`` (UniPool-style:
            cosine similarity of ``x`` and each expert's router row times a learnable scale, then softmax top-k;
            scale-stable in ``‖x‖``; initial scale ``moe_norm_router_scale``), ``tempered_topk`` (top-k logits choose,
            ``softmax(τ·logits)`` over the k weighs, learned ``τ``: 0 weighs the chosen equally, which keeps a
            partitioned dense FFN exact with every expert active whatever the router rows), ``sinkhorn`` (Selective
            Sinkhorn Routing: top-k of ``logits + log v``, ``v`` the column scaling of a balanced transport plan, re-
            solved with ``moe_sinkhorn_iterations`` Sinkhorn steps only on training batches whose expert loads exceed
            ``moe_sinkhorn_imbalance`` × the mean, and carried to inference as a running average: decoding stays
            per token), ``stochastic`` (THOR: k uniformly random experts per token in training, a fixed random
            projection's top-k at inference; two passes per training step with the loss
            ``(CE₁ + CE₂)/2 + moe_consistency_coef · symmetric KL``), ``activation_dense_to_sparse`` (DTS gate:
            ``softmax(act(x W) / τ)``, ``act`` = ``moe_router_activation``, ``τ`` a buffer starting at
            ``moe_router_temperature`` that training anneals (``DenseToSparseAnnealing``); every expert whose gate is
            at least ``moe_router_threshold`` is active, the best one always), ``sqrt_gate`` (HyperP's SqrtGate:
            softmax top-k weights ``√(p / Σ p)``, whose squares sum to 1, so the output RMS stays constant across
            expert granularities), ``dynamic_topk`` (DynaMoE: a per-token number of experts up to the layer's
            capacity, by ``moe_dynamic_k``: ``threshold`` takes the fewest experts whose probabilities reach
            ``moe_dynamic_threshold``, ``complexity`` one plus the capacity's remainder scaled by the normalised
            routing entropy), ``pre_gated`` (Read-ME: one router decoupled from the layers, ``model.pre_gate``, an MLP of
            width ``moe_pre_gate_hidden`` on the token embeddings, gives every sparse layer's logits before the layers
            run, so ``model.plan_experts(input_ids)`` knows each token's experts ahead of time; the chosen are weighted
            ``softmax(τ · logits)`` as ``tempered_topk``).
        moe_capacity_schedule: DynaMoE's per-layer capacity: the experts per token (a fixed-k router's top-k, or a
            per-token router's cap) of each sparse layer, from ``num_experts_per_tok`` down to ``moe_capacity_min``:
            ``uniform``, ``descending`` / ``ascending`` with depth, ``pyramid`` (largest mid-depth) or ``wave``.
        moe_routed_scale: multiplies the weighted sum of the routed experts (DeepSeek's routed scaling factor); a
            dense FFN partitioned into E experts with renormalised top-k weights uses E (``E/k`` per chosen expert).
        moe_zero_experts / moe_copy_experts / moe_constant_experts: MoE++ zero-computation experts routed
            alongside the FFN experts: zero (output 0), copy (output x), constant (``a₁·x + a₂·v`` with
            ``[a₁, a₂] = softmax(W_c x)`` and a learned ``v``). Expert ids: FFN, then zero, copy, constant.
        moe_gating_residual: MoE++ gating residuals: a layer's router logits add ``W_g · logits`` of the previous
            sparse layer (``W_g`` starts at zero, so training starts from the plain router).
        moe_router_bias: a learned per-expert bias on the router logits (zero at init; a converted UniPool model
            uses it to keep each layer on its own experts until training opens the rest of the pool).
        moe_expert_pool: ``per_layer`` or ``global`` (UniPool: one pool of ``moe_pool_size`` FFN experts shared by
            every sparse layer, each with its own router; stored once at ``model.expert_pool``).
        Auxiliary losses, added to the language-model loss when labels are given (each coefficient ``>= 0``):
        moe_load_balance_coef: Switch-style ``E · Σ_e f_e P_e``, per layer (averaged) or over the whole pool
            (``moe_load_balance_scope``; default ``pool`` for a global pool); zero-computation experts count with
            weight ``moe_zc_balance_weight`` (MoE++'s τ).
        moe_z_loss_coef: router z-loss ``mean(logsumexp(logits)²)``.
        moe_tls_coef: BlockFFN token-level sparsity: mean L1 of the ReLU router activations.
        moe_cls_coef / moe_cls_chunk_size: BlockFFN chunk-level sparsity: for each run of ``chunk`` consecutive
            tokens, the soft probability that an expert is used by any of them, ``1 − Π_t (1 − tanh(a_t))``, averaged.
        output_router_logits: return each sparse layer's router logits (and the aux loss) from forward.

    Learned sparse attention (``full_attention`` layers; ``sparse_attn_method`` None = off):
        sparse_attn_method: ``seer`` (SeerAttention block gate: per query block, a learned distribution over key blocks
            picks the blocks to compute) or ``flux`` (Flux Attention layer router: per input, each layer runs full
            attention or a sink + sliding-window branch).
        sparse_attn_block_size: tokens per block for the gate, the kernel and the sparse branch.
        sparse_attn_gate_dim: width of the gate's per-head query/key maps (None: ``head_dim``).
        sparse_attn_selection: how gate probabilities become blocks at inference: ``threshold`` (p >
            ``sparse_attn_threshold``), ``topk`` (``sparse_attn_topk`` blocks per query block) or ``budget``
            (``sparse_attn_token_budget`` tokens per query block). The first and the diagonal block are always kept.
        sparse_attn_router_hidden: hidden width of the Flux router MLP.
        sparse_attn_router_bias: initial logit advantage of the full branch (the converted model starts as the base).
        sparse_attn_sink_blocks / sparse_attn_window_blocks: the Flux sparse branch attends the first blocks (the
            attention sink) and the last ``window`` blocks up to the query.
        sparse_attn_gumbel_tau: Gumbel-softmax temperature of the straight-through layer choice in training.
        sparse_attn_target_sparsity: the fraction of (layer, input) choices that should go to the sparse branch; a
            Lagrangian penalty with learned multipliers enforces it in training.
        sparse_attn_lagrangian_lr_scale: learning-rate multiplier the recipes apply to those multipliers (they must
            grow faster than the routers move for the target to bind within a short budget).
    """

    # RoPE given per layer type is keyed by the attention types whatever this model's layers are (a linearized
    # model's linear layers keep their source layers' RoPE through rope_layer_types).
    _rope_type_labels = ROPE_LAYER_TYPES

    model_type = "hfa_base"
    # The token mixer a layer type gets when token_mixer_types is not given, where it is not the flat fields' choice
    # (a variant whose linear layers are another registered mixer: {"linear_attention": "kda"}).
    default_token_mixers = {}  # no annotation: transformers makes config classes dataclasses
    # Trainer's evaluation gathers every other output as "logits": leave the routing outputs out.
    keys_to_ignore_at_inference = ["past_key_values", "aux_loss", "router_logits"]
    default_theta = 10_000.0

    # transformers turns every config subclass into a dataclass whose generated __eq__ compares only the base
    # class's declared fields; our fields live in __dict__, so compare that (as PreTrainedConfig itself does).
    def __eq__(self, other) -> bool:
        return isinstance(other, PreTrainedConfig) and self.__dict__ == other.__dict__

    __hash__ = None

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.__eq__ = HfArchConfig.__eq__

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 768,
        intermediate_size: int = 2048,
        num_hidden_layers: int = 12,
        num_attention_heads: int = 12,
        num_key_value_heads: int | None = None,
        head_dim: int | None = None,
        hidden_act: str = "silu",
        max_position_embeddings: int = 2048,
        initializer_range: float = 0.02,
        rms_norm_eps: float = 1e-6,
        use_cache: bool = True,
        pad_token_id: int | None = None,
        bos_token_id: int | None = 1,
        eos_token_id: int | list[int] | None = 2,
        tie_word_embeddings: bool = False,
        rope_parameters: dict | None = None,
        attention_bias: bool = False,
        attention_output_bias: bool | None = None,
        attention_dropout: float = 0.0,
        mlp_bias: bool = False,
        qk_norm: bool = False,
        qk_norm_scope: str = "head",
        norm_placement: str = "pre",
        norm_weight_offset: float = 0.0,
        embedding_multiplier: float | None = None,
        query_pre_attn_scalar: float | None = None,
        rope_layer_types: list[str] | None = None,
        layer_types: list[str] | None = None,
        mlp_layer_types: list[str] | None = None,
        token_mixer_types: list[str] | None = None,
        channel_mixer_types: list[str] | None = None,
        mixer_options: dict | None = None,
        sliding_window: int | None = None,
        attn_output_gate: str | None = None,
        attn_output_gate_bias: bool = False,
        attn_output_gate_rank: int | None = None,
        attn_output_gate_scale: float = 1.0,
        attn_output_gate_init: str = "normal",
        attn_output_gate_bias_init: float = 0.0,
        attn_output_gate_lr_scale: float = 1.0,
        attn_score_function: str = "softmax",
        attn_affine: bool = False,
        attn_affine_init: str = "identity",
        move_num_slots: int = 0,
        move_init: str = "identity",
        diff_attn_noise_heads: int = 0,
        diff_attn_lambda_init: float | None = None,
        diff_attn_head_norm: bool = True,
        krr_ridge: float = 1.0,
        krr_temperature: float = 8.0,
        krr_value_range: float | None = 4.0,
        sas_num_heads: int = 0,
        sas_qk_dim: int | None = None,
        residual_update: str = "additive",
        geonorm_step_init: float = 1.0,
        geonorm_layer_decay: float = 0.9,
        sparse_attn_method: str | None = None,
        sparse_attn_block_size: int = 64,
        sparse_attn_gate_dim: int | None = None,
        sparse_attn_selection: str = "threshold",
        sparse_attn_threshold: float = 5e-3,
        sparse_attn_topk: int = 8,
        sparse_attn_token_budget: int = 512,
        sparse_attn_router_hidden: int = 64,
        sparse_attn_router_bias: float = 4.5,
        sparse_attn_sink_blocks: int = 1,
        sparse_attn_window_blocks: int = 4,
        sparse_attn_gumbel_tau: float = 1.0,
        sparse_attn_target_sparsity: float = 0.5,
        sparse_attn_lagrangian_lr_scale: float = 10.0,
        linear_attn_type: str = "gla",
        linear_attn_gate: str = "low_rank",
        linear_attn_gate_low_rank_dim: int = 16,
        linear_attn_gate_normalizer: float = 16.0,
        linear_attn_conv_size: int = 0,
        linear_attn_qk_norm: str = "none",
        linear_attn_output_norm: str = "gated_rmsnorm",
        linear_attn_use_rope: bool = False,
        linear_attn_hybrid: str = "none",
        linear_attn_mix_weights: list[float] | tuple[float, float] = (0.5, 0.5),
        linear_attn_num_sinks: int = 0,
        linear_attn_selection_block: int = 16,
        linear_attn_selection_topk: int = 2,
        linear_attn_feature_map: str = "identity",
        linear_attn_normalize: bool = False,
        full_attention_layers: list[int] | None = None,
        linear_to_full_ratio: int | None = None,
        moe_sparse_step: int | None = None,
        num_experts: int = 8,
        num_experts_per_tok: int = 2,
        moe_intermediate_size: int | None = None,
        num_shared_experts: int = 0,
        shared_expert_intermediate_size: int | None = None,
        shared_expert_gate: bool = False,
        moe_router: str = "softmax_topk",
        moe_norm_topk_prob: bool = True,
        moe_routed_scale: float = 1.0,
        moe_norm_router_scale: float = 10.0,
        moe_zero_experts: int = 0,
        moe_copy_experts: int = 0,
        moe_constant_experts: int = 0,
        moe_gating_residual: bool = False,
        moe_router_bias: bool = False,
        moe_expert_pool: str = "per_layer",
        moe_pool_size: int | None = None,
        moe_load_balance_coef: float = 0.01,
        moe_load_balance_scope: str | None = None,
        moe_zc_balance_weight: float = 1.0,
        moe_z_loss_coef: float = 0.0,
        moe_tls_coef: float = 0.0,
        moe_cls_coef: float = 0.0,
        moe_cls_chunk_size: int = 8,
        output_router_logits: bool = False,
        moe_sinkhorn_iterations: int = 3,
        moe_sinkhorn_imbalance: float = 1.25,
        moe_consistency_coef: float = 1.0,
        moe_router_activation: str = "gelu",
        moe_router_temperature: float = 1.0,
        moe_router_threshold: float = 0.05,
        moe_dynamic_k: str = "threshold",
        moe_dynamic_threshold: float = 0.5,
        moe_capacity_schedule: str = "uniform",
        moe_capacity_min: int = 1,
        moe_pre_gate_hidden: int = 256,
        **kwargs,
    ):
        for retired in RETIRED_FIELDS:  # in configs saved by earlier releases; they never changed a model
            kwargs.pop(retired, None)
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_attention_heads if num_key_value_heads is None else num_key_value_heads
        self.head_dim = head_dim if head_dim is not None else _default_head_dim(hidden_size, num_attention_heads)
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.use_cache = use_cache
        self.rope_parameters = rope_parameters
        self.attention_bias = attention_bias
        self.attention_output_bias = attention_bias if attention_output_bias is None else attention_output_bias
        self.attention_dropout = attention_dropout
        self.mlp_bias = mlp_bias
        self.qk_norm = qk_norm
        self.qk_norm_scope = qk_norm_scope
        self.norm_placement = norm_placement
        self.norm_weight_offset = norm_weight_offset
        self.embedding_multiplier = embedding_multiplier
        self.query_pre_attn_scalar = query_pre_attn_scalar
        self.rope_layer_types = list(rope_layer_types) if rope_layer_types is not None else None
        self.sliding_window = sliding_window
        # Explicit per-layer channel mixers by registered name (None: mlp_layer_types names them); mlp_layer_types then
        # follows (transformers' own validators accept "dense" / "sparse" only).
        self.channel_mixer_types = list(channel_mixer_types) if channel_mixer_types is not None else None
        if self.channel_mixer_types is not None and mlp_layer_types is None and moe_sparse_step is None:
            mlp_layer_types = [CHANNEL_MIXER_KINDS.get(name, "dense") for name in self.channel_mixer_types]
        self.mlp_layer_types = _resolve_mlp_layout(self, mlp_layer_types, moe_sparse_step)
        self.moe_sparse_step = None  # folded into mlp_layer_types, which is what gets saved
        self.num_experts = num_experts
        self.num_experts_per_tok = num_experts_per_tok
        self.moe_intermediate_size = intermediate_size if moe_intermediate_size is None else moe_intermediate_size
        self.num_shared_experts = num_shared_experts
        self.shared_expert_intermediate_size = (
            num_shared_experts * self.moe_intermediate_size
            if shared_expert_intermediate_size is None else shared_expert_intermediate_size
        )
        self.shared_expert_gate = shared_expert_gate
        self.moe_router = moe_router
        self.moe_norm_topk_prob = moe_norm_topk_prob
        self.moe_routed_scale = moe_routed_scale
        self.moe_norm_router_scale = moe_norm_router_scale
        self.moe_zero_experts = moe_zero_experts
        self.moe_copy_experts = moe_copy_experts
        self.moe_constant_experts = moe_constant_experts
        self.moe_gating_residual = moe_gating_residual
        self.moe_router_bias = moe_router_bias
        self.moe_expert_pool = moe_expert_pool
        self.moe_pool_size = num_experts if moe_pool_size is None else moe_pool_size
        self.moe_load_balance_coef = moe_load_balance_coef
        self.moe_load_balance_scope = moe_load_balance_scope or ("pool" if moe_expert_pool == "global" else "layer")
        self.moe_zc_balance_weight = moe_zc_balance_weight
        self.moe_z_loss_coef = moe_z_loss_coef
        self.moe_tls_coef = moe_tls_coef
        self.moe_cls_coef = moe_cls_coef
        self.moe_cls_chunk_size = moe_cls_chunk_size
        self.output_router_logits = output_router_logits
        self.moe_sinkhorn_iterations = moe_sinkhorn_iterations
        self.moe_sinkhorn_imbalance = moe_sinkhorn_imbalance
        self.moe_consistency_coef = moe_consistency_coef
        self.moe_router_activation = moe_router_activation
        self.moe_router_temperature = moe_router_temperature
        self.moe_router_threshold = moe_router_threshold
        self.moe_dynamic_k = moe_dynamic_k
        self.moe_dynamic_threshold = moe_dynamic_threshold
        self.moe_capacity_schedule = moe_capacity_schedule
        self.moe_capacity_min = moe_capacity_min
        self.moe_pre_gate_hidden = moe_pre_gate_hidden
        self.attn_output_gate = attn_output_gate
        self.attn_output_gate_bias = attn_output_gate_bias
        self.attn_output_gate_rank = attn_output_gate_rank
        self.attn_output_gate_scale = attn_output_gate_scale
        self.attn_output_gate_init = attn_output_gate_init
        self.attn_output_gate_bias_init = attn_output_gate_bias_init
        self.attn_output_gate_lr_scale = attn_output_gate_lr_scale
        self.attn_score_function = attn_score_function
        self.attn_affine = attn_affine
        self.attn_affine_init = attn_affine_init
        self.move_num_slots = move_num_slots
        self.move_init = move_init
        self.diff_attn_noise_heads = diff_attn_noise_heads
        self.diff_attn_lambda_init = diff_attn_lambda_init
        self.diff_attn_head_norm = diff_attn_head_norm
        self.krr_ridge = krr_ridge
        self.krr_temperature = krr_temperature
        self.krr_value_range = krr_value_range
        self.sas_num_heads = sas_num_heads
        # Simulated heads default to twice the real query/key width (the paper widens both heads and q/k features).
        self.sas_qk_dim = 2 * self.head_dim if sas_qk_dim is None and sas_num_heads else sas_qk_dim
        self.residual_update = residual_update
        self.geonorm_step_init = geonorm_step_init
        self.geonorm_layer_decay = geonorm_layer_decay
        self.sparse_attn_method = sparse_attn_method
        self.sparse_attn_block_size = sparse_attn_block_size
        self.sparse_attn_gate_dim = sparse_attn_gate_dim
        self.sparse_attn_selection = sparse_attn_selection
        self.sparse_attn_threshold = sparse_attn_threshold
        self.sparse_attn_topk = sparse_attn_topk
        self.sparse_attn_token_budget = sparse_attn_token_budget
        self.sparse_attn_router_hidden = sparse_attn_router_hidden
        self.sparse_attn_router_bias = sparse_attn_router_bias
        self.sparse_attn_sink_blocks = sparse_attn_sink_blocks
        self.sparse_attn_window_blocks = sparse_attn_window_blocks
        self.sparse_attn_gumbel_tau = sparse_attn_gumbel_tau
        self.sparse_attn_target_sparsity = sparse_attn_target_sparsity
        self.sparse_attn_lagrangian_lr_scale = sparse_attn_lagrangian_lr_scale
        self.linear_attn_type = linear_attn_type
        self.linear_attn_gate = linear_attn_gate
        self.linear_attn_gate_low_rank_dim = linear_attn_gate_low_rank_dim
        self.linear_attn_gate_normalizer = linear_attn_gate_normalizer
        self.linear_attn_conv_size = linear_attn_conv_size
        self.linear_attn_qk_norm = linear_attn_qk_norm
        self.linear_attn_output_norm = linear_attn_output_norm
        self.linear_attn_use_rope = linear_attn_use_rope
        self.linear_attn_hybrid = linear_attn_hybrid
        self.linear_attn_mix_weights = [float(w) for w in linear_attn_mix_weights]
        self.linear_attn_num_sinks = linear_attn_num_sinks
        self.linear_attn_selection_block = linear_attn_selection_block
        self.linear_attn_selection_topk = linear_attn_selection_topk
        self.linear_attn_feature_map = linear_attn_feature_map
        self.linear_attn_normalize = linear_attn_normalize
        # Explicit per-layer mixers by registered name (None: chosen from the flat fields, see token_mixer_type), and
        # the options of mixers that keep theirs grouped ({name: {option: value}}, read by the mixer's options class).
        self.token_mixer_types = list(token_mixer_types) if token_mixer_types is not None else None
        self.mixer_options = {k: dict(v) for k, v in mixer_options.items()} if mixer_options else None
        if layer_types is None and self.token_mixer_types is not None and full_attention_layers is None \
                and linear_to_full_ratio is None:
            layer_types = _layer_types_of_mixers(self, self.token_mixer_types)
        self.layer_types = _resolve_layer_layout(self, layer_types, full_attention_layers, linear_to_full_ratio)
        # The shorthands are folded into layer_types, which is what gets saved.
        self.full_attention_layers = None
        self.linear_to_full_ratio = None
        # Fields of scores / features registered by other packages: set before validation, which reads them.
        for field in _registered_part_fields():
            if field in kwargs:
                setattr(self, field, kwargs.pop(field))
        # Ours first: transformers' own validators would report the same problems less specifically.
        self.validate_hf_arch()
        # A new config must name a registered score; a saved one (it carries transformers_version) may name one its
        # remote code registers after this config loads, checked when the model builds it.
        if self.attn_score_function not in ATTENTION_SCORE_SPECS and "transformers_version" not in kwargs:
            raise ValueError(f"{type(self).__name__}.attn_score_function must be one of "
                             f"{tuple(ATTENTION_SCORE_SPECS)} (registered scores), got {self.attn_score_function!r}")
        if not rope_per_layer_type(rope_parameters):  # nested parameters carry their own theta per layer type
            kwargs.setdefault("rope_theta", kwargs.pop("rope_theta", self.default_theta))
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )

    def validate_hf_arch(self) -> None:
        """Reject values out of range or inconsistent, naming the field."""
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{type(self).__name__}.{name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(
                f"{type(self).__name__}: num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads}) for grouped-query attention"
            )
        if not 0.0 <= float(self.attention_dropout) < 1.0:
            raise ValueError(f"{type(self).__name__}.attention_dropout must be in [0, 1), got {self.attention_dropout}")
        if self.rms_norm_eps <= 0:
            raise ValueError(f"{type(self).__name__}.rms_norm_eps must be > 0, got {self.rms_norm_eps}")
        for field, allowed in (("qk_norm_scope", QK_NORM_SCOPES), ("norm_placement", NORM_PLACEMENTS)):
            if getattr(self, field) not in allowed:
                raise ValueError(f"{type(self).__name__}.{field} must be one of {allowed}, got {getattr(self, field)!r}")
        if self.query_pre_attn_scalar is not None and not self.query_pre_attn_scalar > 0:
            raise ValueError(f"{type(self).__name__}.query_pre_attn_scalar must be > 0, got {self.query_pre_attn_scalar!r}")
        _check_per_layer(self, "layer_types", SUPPORTED_LAYER_TYPES)
        _check_per_layer(self, "mlp_layer_types", ("dense", "sparse"))
        if self.channel_mixer_types is not None:
            # Mixers this process has not registered (another package's, or one the flat remote-code modeling file
            # registers after this config loads) are checked when the model builds them.
            _check_per_layer(self, "channel_mixer_types", None)
            for i, (name, kind) in enumerate(zip(self.channel_mixer_types, self.mlp_layer_types)):
                if CHANNEL_MIXER_KINDS.get(name, kind) != kind:
                    raise ValueError(f"{type(self).__name__}: layer {i} has channel mixer {name!r}, a "
                                     f"{CHANNEL_MIXER_KINDS[name]!r} layer, but mlp_layer_types[{i}] is {kind!r}")
        self._validate_token_mixers()
        self._validate_rope_per_layer_type()
        if "sliding_attention" in self.layer_types and (self.sliding_window is None or self.sliding_window <= 0):
            raise ValueError(
                f"{type(self).__name__}: layer_types contains 'sliding_attention' but sliding_window is "
                f"{self.sliding_window!r}; set a positive window size"
            )
        self._validate_output_gate()
        self._validate_attention_scores()
        if any(t in LINEAR_LAYER_TYPES for t in self.layer_types):
            self._validate_linear_attention()
        if "sparse" in self.mlp_layer_types:
            self._validate_moe()
        if self.sparse_attn_method is not None:
            self._validate_sparse_attention()
        self._validate_attention_only_switches()
        self._validate_mechanism_options()

    def convert_rope_params_to_dict(self, **kwargs):
        """RoPE given per layer type keeps its nested form: transformers releases before 5.25 would add a flat
        ``rope_theta`` beside the per-type dicts (and then fail their own validation)."""
        if not rope_per_layer_type(self.rope_parameters):
            return super().convert_rope_params_to_dict(**kwargs)
        kwargs.pop("rope_scaling", None)
        kwargs.pop("rope_theta", None)
        for parameters in rope_per_layer_type(self.rope_parameters).values():
            parameters.setdefault("rope_type", "default")
        return kwargs

    def softmax_scale(self, head_dim: int) -> float:
        """The score scale of softmax attention: ``query_pre_attn_scalar ** -0.5`` (Gemma) or ``head_dim ** -0.5``."""
        return (self.query_pre_attn_scalar or head_dim) ** -0.5

    def _validate_rope_per_layer_type(self) -> None:
        rope = rope_per_layer_type(self.rope_parameters)
        if not rope:
            return
        needed = {t if t in ("full_attention", "sliding_attention") else "full_attention"
                  for t in (self.rope_layer_types or self.layer_types)}
        if self.rope_layer_types is not None and len(self.rope_layer_types) != self.num_hidden_layers:
            raise ValueError(f"{type(self).__name__}.rope_layer_types has {len(self.rope_layer_types)} entries for "
                             f"{self.num_hidden_layers} layers")
        missing = sorted(needed - set(rope))
        if missing:
            raise ValueError(f"{type(self).__name__}.rope_parameters is given per layer type ({sorted(rope)}) but has "
                             f"none for {missing} (linear layers take the full_attention one)")

    def _validate_attention_only_switches(self) -> None:
        """A softmax-attention feature (or score other than softmax) switched on must be built by one of this config's
        token mixers (``TokenMixerSpec.attention_features``); otherwise it would be silently ignored."""
        specs = self._known_mixer_specs()
        switched = [(name, spec.switch) for name, spec in self.attention_features_on()]
        if self.attn_score_function != "softmax":
            switched.append(("score_function", "attn_score_function"))
        for name, field in switched:
            if not any(spec.builds_feature(name) for spec in specs):
                raise ValueError(
                    f"{type(self).__name__} ({self.model_type}): {field}={getattr(self, field)!r} acts on softmax "
                    f"attention mixers and none of this config's token mixers ({sorted(self.token_mixer_names())}) "
                    "builds it"
                )

    def attention_features_on(self) -> list[tuple[str, AttentionFeatureSpec]]:
        return attention_features_on(self)

    # -- token mixers -------------------------------------------------------------------------------------------

    def token_mixer_type(self, layer_idx: int) -> str:
        """The registered name of layer ``layer_idx``'s token mixer: ``token_mixer_types`` where given, else (configs
        of the built-in variants, and every checkpoint saved before it existed) the one the flat fields choose."""
        if self.token_mixer_types is not None:
            return self.token_mixer_types[layer_idx]
        layer_type = self.layer_types[layer_idx]
        default = type(self).default_token_mixers.get(layer_type)
        if default is not None:
            return default
        if layer_type in LINEAR_LAYER_TYPES:
            return self.linear_attn_type
        if layer_type == "full_attention" and self.sparse_attn_method is not None:
            return "sparse_attention"
        return "attention"

    def token_mixer_names(self) -> set[str]:
        """The token mixers this config builds (registered names)."""
        return {self.token_mixer_type(i) for i in range(self.num_hidden_layers)}

    def _known_mixer_specs(self) -> list[TokenMixerSpec]:
        return [TOKEN_MIXER_SPECS[n] for n in sorted(self.token_mixer_names()) if n in TOKEN_MIXER_SPECS]

    def channel_mixer_type(self, layer_idx: int) -> str:
        """The registered name of layer ``layer_idx``'s channel mixer (``channel_mixer_types``, else mlp_layer_types)."""
        if self.channel_mixer_types is not None:
            return self.channel_mixer_types[layer_idx]
        return self.mlp_layer_types[layer_idx]

    def options_of(self, mixer: str) -> dict:
        """``mixer_options[mixer]`` (empty where not given): what that mixer's options class is built from."""
        return dict((self.mixer_options or {}).get(mixer, {}))

    def _validate_token_mixers(self) -> None:
        cls = type(self).__name__
        if self.token_mixer_types is not None:
            if len(self.token_mixer_types) != self.num_hidden_layers:
                raise ValueError(f"{cls}.token_mixer_types has {len(self.token_mixer_types)} entries but "
                                 f"num_hidden_layers is {self.num_hidden_layers}")
            for i, (name, layer_type) in enumerate(zip(self.token_mixer_types, self.layer_types)):
                if not isinstance(name, str) or not name:
                    raise ValueError(f"{cls}.token_mixer_types[{i}] must be a registered mixer name, got {name!r}")
                # A mixer this process has not registered (another package's, or one the flat remote-code modeling
                # file registers after this config loads) is checked when the model builds it.
                allowed = TOKEN_MIXER_SPECS[name].layer_types if name in TOKEN_MIXER_SPECS else (layer_type,)
                if layer_type not in allowed:
                    raise ValueError(f"{cls}: layer {i} has token mixer {name!r}, which sits at layer types {allowed}, "
                                     f"but layer_types[{i}] is {layer_type!r}")
                if name in LINEAR_ATTN_TYPES and name != self.linear_attn_type:
                    raise ValueError(f"{cls}: layer {i} has token mixer {name!r} but linear_attn_type is "
                                     f"{self.linear_attn_type!r} (the built-in linear mixers read it); make them agree")
                if name == "sparse_attention" and self.sparse_attn_method is None:
                    raise ValueError(f"{cls}: layer {i} has token mixer 'sparse_attention' but sparse_attn_method "
                                     "is None; set 'seer' or 'flux'")
        if self.mixer_options is not None:
            if not isinstance(self.mixer_options, dict):
                raise ValueError(f"{cls}.mixer_options must be a dict {{mixer name: {{option: value}}}}, got "
                                 f"{type(self.mixer_options).__name__}")
            used = self.token_mixer_names() | {self.channel_mixer_type(i) for i in range(self.num_hidden_layers)}
            unused = sorted(set(self.mixer_options) - used)
            if unused:
                raise ValueError(f"{cls}.mixer_options has options for {unused}, which no layer uses (mixers: "
                                 f"{sorted(used)})")

    def _validate_mechanism_options(self) -> None:
        """Refuse a field set away from its default while the mechanism that reads it is off (``_MECHANISM_OPTIONS``)."""
        defaults = _declared_defaults(type(self))
        for mechanism, is_on, fields in _mechanism_options():
            if is_on(self):
                continue
            for field in fields:
                value, default = getattr(self, field), self._option_default(field, defaults)
                if not _same_value(value, default):
                    raise ValueError(
                        f"{type(self).__name__} ({self.model_type}): {field}={value!r} is an option of {mechanism}, "
                        f"which this config does not have; leave {field} at its default ({default!r}) or turn that "
                        "mechanism on"
                    )

    def _option_default(self, field: str, declared: dict):
        """A field's default: the declared one, or for fields derived from others when not given, the derived value
        (what a saved config holds)."""
        if field == "moe_intermediate_size":
            return self.intermediate_size
        if field == "shared_expert_intermediate_size":
            return self.num_shared_experts * self.moe_intermediate_size
        if field == "moe_pool_size":
            return self.num_experts
        if field == "moe_load_balance_scope":
            return "pool" if self.moe_expert_pool == "global" else "layer"
        return declared[field]

    def _validate_attention_scores(self) -> None:
        cls = type(self).__name__
        # A score this process has not registered (another package's, or one the flat remote-code modeling file
        # registers after this config loads) is checked when the model builds it.
        if not isinstance(self.attn_score_function, str) or not self.attn_score_function:
            raise ValueError(f"{cls}.attn_score_function must be a registered score name, one of "
                             f"{tuple(ATTENTION_SCORE_SPECS)}, got {self.attn_score_function!r}")
        if self.attn_affine_init not in ("identity", "normal"):
            raise ValueError(f"{cls}.attn_affine_init must be 'identity' or 'normal', got {self.attn_affine_init!r}")
        if not isinstance(self.attn_affine, bool):
            raise ValueError(f"{cls}.attn_affine must be a bool, got {self.attn_affine!r}")
        if not _is_count(self.move_num_slots):
            raise ValueError(f"{cls}.move_num_slots must be an integer >= 0 (0 = no value bank), got "
                             f"{self.move_num_slots!r}")
        if self.move_init not in ("identity", "normal"):
            raise ValueError(f"{cls}.move_init must be 'identity' or 'normal', got {self.move_init!r}")
        self._validate_krr()
        score = _score_spec(self)
        for name, spec in self.attention_features_on():
            if not spec.any_score and not score.in_backend:
                raise ValueError(f"{cls}: {spec.switch}={getattr(self, spec.switch)!r} ({spec.description}) runs "
                                 "softmax attention through the backend; it does not combine with "
                                 f"attn_score_function={self.attn_score_function!r}")
        self._validate_differential()
        self._validate_simulated_heads()
        self._validate_residual_update()

    def _validate_krr(self) -> None:
        cls = type(self).__name__
        if not _is_number(self.krr_ridge) or not math.isfinite(self.krr_ridge) or self.krr_ridge <= 0:
            raise ValueError(f"{cls}.krr_ridge (the ridge λ of Cubit's kernel ridge regression) must be a finite number "
                             f"> 0, got {self.krr_ridge!r}")
        if not _is_number(self.krr_temperature) or not self.krr_temperature > 0:
            raise ValueError(f"{cls}.krr_temperature must be > 0, got {self.krr_temperature!r}")
        if self.krr_value_range is not None and not (_is_number(self.krr_value_range) and self.krr_value_range > 0):
            raise ValueError(f"{cls}.krr_value_range must be > 0 or None (no Limited-Range Rescale), got "
                             f"{self.krr_value_range!r}")

    def _validate_differential(self) -> None:
        cls, noise = type(self).__name__, self.diff_attn_noise_heads
        if not _is_count(noise):
            raise ValueError(f"{cls}.diff_attn_noise_heads must be an integer >= 0 (0 = no differential attention), "
                             f"got {noise!r}")
        if not noise:
            return
        if self.num_attention_heads % noise:
            raise ValueError(f"{cls}: diff_attn_noise_heads ({noise}) must divide num_attention_heads "
                             f"({self.num_attention_heads}, the signal heads): each noise head is shared by an equal "
                             "group of signal heads")
        if not isinstance(self.diff_attn_head_norm, bool):
            raise ValueError(f"{cls}.diff_attn_head_norm must be a bool, got {self.diff_attn_head_norm!r}")
        if self.diff_attn_lambda_init is not None and not _is_number(self.diff_attn_lambda_init):
            raise ValueError(f"{cls}.diff_attn_lambda_init must be a number or None, got {self.diff_attn_lambda_init!r}")
        if self.attn_affine or self.sas_num_heads:
            raise ValueError(f"{cls}: diff_attn_noise_heads subtracts two softmax maps; it does not combine with "
                             "attn_affine / sas_num_heads")

    def _validate_simulated_heads(self) -> None:
        cls, heads = type(self).__name__, self.sas_num_heads
        if not _is_count(heads):
            raise ValueError(f"{cls}.sas_num_heads must be an integer >= 0 (0 = off), got {heads!r}")
        if not heads:
            return
        if heads % self.num_attention_heads:
            raise ValueError(f"{cls}.sas_num_heads ({heads}) must be a multiple of num_attention_heads "
                             f"({self.num_attention_heads}): each real head seeds the same number of simulated heads")
        if not _is_count(self.sas_qk_dim) or self.sas_qk_dim < self.head_dim or self.sas_qk_dim % 2:
            raise ValueError(f"{cls}.sas_qk_dim must be an even integer >= head_dim ({self.head_dim}), got "
                             f"{self.sas_qk_dim!r}")
        if self.attn_affine:
            raise ValueError(f"{cls}: sas_num_heads runs softmax attention through the backend; it does not combine "
                             "with attn_affine")

    def _validate_residual_update(self) -> None:
        cls = type(self).__name__
        if self.residual_update not in RESIDUAL_UPDATES:
            raise ValueError(f"{cls}.residual_update must be one of {RESIDUAL_UPDATES}, got {self.residual_update!r}")
        if not _is_number(self.geonorm_step_init) or not self.geonorm_step_init > 0:
            raise ValueError(f"{cls}.geonorm_step_init must be > 0, got {self.geonorm_step_init!r}")
        if not _is_number(self.geonorm_layer_decay) or not 0 < self.geonorm_layer_decay <= 1:
            raise ValueError(f"{cls}.geonorm_layer_decay must be in (0, 1], got {self.geonorm_layer_decay!r}")

    def _validate_sparse_attention(self) -> None:
        cls = type(self).__name__
        for field, allowed in (("sparse_attn_method", SPARSE_ATTN_METHODS),
                               ("sparse_attn_selection", SPARSE_ATTN_SELECTIONS)):
            if getattr(self, field) not in allowed:
                raise ValueError(f"{cls}.{field} must be one of {allowed}, got {getattr(self, field)!r}")
        for field, minimum in (("sparse_attn_block_size", 1), ("sparse_attn_topk", 1),
                               ("sparse_attn_token_budget", 1), ("sparse_attn_router_hidden", 1),
                               ("sparse_attn_sink_blocks", 0), ("sparse_attn_window_blocks", 1)):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                raise ValueError(f"{cls}.{field} must be an integer >= {minimum}, got {value!r}")
        if self.sparse_attn_gate_dim is not None and (not isinstance(self.sparse_attn_gate_dim, int)
                                                      or self.sparse_attn_gate_dim < 2 or self.sparse_attn_gate_dim % 2):
            raise ValueError(f"{cls}.sparse_attn_gate_dim must be an even integer >= 2 (RoPE pairs channels) or None, "
                             f"got {self.sparse_attn_gate_dim!r}")
        if not 0.0 <= self.sparse_attn_threshold < 1.0:
            raise ValueError(f"{cls}.sparse_attn_threshold must be in [0, 1), got {self.sparse_attn_threshold!r}")
        if not 0.0 <= self.sparse_attn_target_sparsity <= 1.0:
            raise ValueError(f"{cls}.sparse_attn_target_sparsity must be in [0, 1], got "
                             f"{self.sparse_attn_target_sparsity!r}")
        if not self.sparse_attn_lagrangian_lr_scale > 0:
            raise ValueError(f"{cls}.sparse_attn_lagrangian_lr_scale must be > 0, got "
                             f"{self.sparse_attn_lagrangian_lr_scale!r}")
        if not self.sparse_attn_gumbel_tau > 0:
            raise ValueError(f"{cls}.sparse_attn_gumbel_tau must be > 0, got {self.sparse_attn_gumbel_tau!r}")
        if not math.isfinite(self.sparse_attn_router_bias):
            raise ValueError(f"{cls}.sparse_attn_router_bias must be finite, got {self.sparse_attn_router_bias!r}")
        sparse = TOKEN_MIXER_SPECS["sparse_attention"]
        unsupported = [f"{spec.switch}={getattr(self, spec.switch)!r}" for name, spec in self.attention_features_on()
                       if not sparse.builds_feature(name)]
        if self.attn_score_function != "softmax":
            unsupported.insert(0, f"attn_score_function={self.attn_score_function!r}")
        if unsupported:
            raise ValueError(f"{cls}.sparse_attn_method={self.sparse_attn_method!r} works on softmax attention; it does "
                             f"not combine with {' / '.join(unsupported)}")
        if "full_attention" not in self.layer_types:
            raise ValueError(f"{cls}.sparse_attn_method={self.sparse_attn_method!r} acts on full_attention layers, "
                             "and layer_types has none")

    @property
    def attention_needs_padding_mask(self) -> bool:
        return attention_needs_padding_mask(self)

    def attention_kernel_conflicts(self) -> list[str]:
        return attention_kernel_conflicts(self)

    @property
    def num_zero_computation_experts(self) -> int:
        return self.moe_zero_experts + self.moe_copy_experts + self.moe_constant_experts

    @property
    def num_ffn_experts(self) -> int:
        """FFN experts a router chooses among: the layer's own, or the global pool's."""
        return self.moe_pool_size if self.moe_expert_pool == "global" else self.num_experts

    @property
    def num_routed_experts(self) -> int:
        """Width of each router: FFN experts plus zero-computation experts."""
        return self.num_ffn_experts + self.num_zero_computation_experts

    def _validate_output_gate(self) -> None:
        cls = type(self).__name__
        if self.attn_output_gate not in (None, *OUTPUT_GATE_GRANULARITIES):
            raise ValueError(
                f"{cls}.attn_output_gate must be None or one of {OUTPUT_GATE_GRANULARITIES}, got {self.attn_output_gate!r}"
            )
        if self.attn_output_gate_init not in OUTPUT_GATE_INITS:
            raise ValueError(
                f"{cls}.attn_output_gate_init must be one of {OUTPUT_GATE_INITS}, got {self.attn_output_gate_init!r}"
            )
        rank = self.attn_output_gate_rank
        if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0):
            raise ValueError(f"{cls}.attn_output_gate_rank must be a positive integer or None, got {rank!r}")
        if not self.attn_output_gate_scale > 0:
            raise ValueError(f"{cls}.attn_output_gate_scale must be > 0, got {self.attn_output_gate_scale!r}")
        if not self.attn_output_gate_lr_scale > 0:
            raise ValueError(f"{cls}.attn_output_gate_lr_scale must be > 0, got {self.attn_output_gate_lr_scale!r}")


    def _validate_linear_attention(self) -> None:
        cls = type(self).__name__
        for field, allowed in (
            ("linear_attn_type", LINEAR_ATTN_TYPES),
            ("linear_attn_gate", LINEAR_ATTN_GATES),
            ("linear_attn_qk_norm", LINEAR_ATTN_QK_NORMS),
            ("linear_attn_output_norm", LINEAR_ATTN_OUTPUT_NORMS),
            ("linear_attn_hybrid", LINEAR_ATTN_HYBRIDS),
            ("linear_attn_feature_map", LINEAR_ATTN_FEATURE_MAPS),
        ):
            if getattr(self, field) not in allowed:
                raise ValueError(f"{cls}.{field} must be one of {allowed}, got {getattr(self, field)!r}")
        for field, minimum in (("linear_attn_gate_low_rank_dim", 1), ("linear_attn_conv_size", 0),
                               ("linear_attn_num_sinks", 0), ("linear_attn_selection_block", 1),
                               ("linear_attn_selection_topk", 0)):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                raise ValueError(f"{cls}.{field} must be an integer >= {minimum}, got {value!r}")
        if not self.linear_attn_gate_normalizer > 0:
            raise ValueError(f"{cls}.linear_attn_gate_normalizer must be > 0, got {self.linear_attn_gate_normalizer!r}")
        if len(self.linear_attn_mix_weights) != 2:
            raise ValueError(f"{cls}.linear_attn_mix_weights must be [w_linear, w_window], got {self.linear_attn_mix_weights}")
        hybrid = self.linear_attn_hybrid != "none"
        if hybrid and (self.sliding_window is None or self.sliding_window <= 0):
            raise ValueError(f"{cls}: linear_attn_hybrid={self.linear_attn_hybrid!r} needs a positive sliding_window "
                             f"(the window branch's size), got {self.sliding_window!r}")
        still = self.linear_attn_hybrid == "still"
        if "hybrid_sliding" in self.layer_types and (not hybrid or still):
            raise ValueError(f"{cls}.layer_types has 'hybrid_sliding' layers but linear_attn_hybrid is "
                             f"{self.linear_attn_hybrid!r} (window hybrids: liger, lizard, lolcats)")
        if "hybrid" in self.layer_types and not still:
            raise ValueError(f"{cls}.layer_types has 'hybrid' layers (a linear state plus every key) but "
                             f"linear_attn_hybrid is {self.linear_attn_hybrid!r} (only 'still' keeps every key)")
        if still:
            block, topk = self.linear_attn_selection_block, self.linear_attn_selection_topk
            if topk > block:
                raise ValueError(f"{cls}.linear_attn_selection_topk ({topk}) must not exceed linear_attn_selection_block "
                                 f"({block})")
            if block > self.sliding_window:
                raise ValueError(f"{cls}.linear_attn_selection_block ({block}) must not exceed sliding_window "
                                 f"({self.sliding_window}): a token may leave the window only once its block's "
                                 "selection is made")
        if not isinstance(self.linear_attn_normalize, bool):
            raise ValueError(f"{cls}.linear_attn_normalize must be a bool, got {self.linear_attn_normalize!r}")
        if self.linear_attn_normalize and self.linear_attn_type != "gla":
            raise ValueError(f"{cls}.linear_attn_normalize applies to linear_attn_type='gla' only (the delta rule "
                             f"has no normaliser), got {self.linear_attn_type!r}")
        if self.linear_attn_feature_map != "identity" and "kda" in self.token_mixer_names():
            raise ValueError(f"{cls}.linear_attn_feature_map={self.linear_attn_feature_map!r} applies to the GLA and "
                             "Gated DeltaNet mixers; KDA layers take their q/k as they are (their options: "
                             "mixer_options['kda'])")
        if self.linear_attn_normalize and self.linear_attn_feature_map == "identity":
            raise ValueError(f"{cls}.linear_attn_normalize needs a positive feature map (linear_attn_feature_map "
                             "'softmax', 'hedgehog', 'norm_aware' or 'np_map'): with 'identity' the denominator φ(q)·z can be <= 0")
        if self.linear_attn_hybrid in ("lolcats", "still"):
            if not self.linear_attn_normalize:
                raise ValueError(f"{cls}: linear_attn_hybrid={self.linear_attn_hybrid!r} shares the linear branch's denominator φ(q)·z "
                                 "with the window's softmax mass, so it needs linear_attn_normalize=True")
            w_linear, gamma = self.linear_attn_mix_weights
            if not 0 < gamma < 1 or not w_linear > 0:
                raise ValueError(f"{cls}.linear_attn_mix_weights for linear_attn_hybrid={self.linear_attn_hybrid!r} are [w_linear > 0, "
                                 f"γ₀ in (0, 1)] (γ = sigmoid of a learnable logit), got {self.linear_attn_mix_weights}")
        if self.linear_attn_num_sinks and self.linear_attn_hybrid != "lizard":
            raise ValueError(f"{cls}.linear_attn_num_sinks applies to linear_attn_hybrid='lizard' only, "
                             f"got {self.linear_attn_num_sinks} with {self.linear_attn_hybrid!r}")


    def _validate_moe(self) -> None:
        cls = type(self).__name__
        for field, allowed in (("moe_router", tuple(MOE_ROUTER_SPECS)), ("moe_expert_pool", MOE_EXPERT_POOLS),
                               ("moe_load_balance_scope", MOE_BALANCE_SCOPES)):
            if getattr(self, field) not in allowed:
                raise ValueError(f"{cls}.{field} must be one of {allowed}, got {getattr(self, field)!r}")
        for field, minimum in (("num_experts", 1), ("num_experts_per_tok", 1), ("moe_intermediate_size", 1),
                               ("num_shared_experts", 0), ("shared_expert_intermediate_size", 0),
                               ("moe_zero_experts", 0), ("moe_copy_experts", 0), ("moe_constant_experts", 0),
                               ("moe_pool_size", 1), ("moe_cls_chunk_size", 1)):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                raise ValueError(f"{cls}.{field} must be an integer >= {minimum}, got {value!r}")
        for field in ("moe_load_balance_coef", "moe_zc_balance_weight", "moe_z_loss_coef", "moe_tls_coef",
                      "moe_cls_coef"):
            value = getattr(self, field)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0:
                raise ValueError(f"{cls}.{field} must be a number >= 0, got {value!r}")
        if not (isinstance(self.moe_routed_scale, (int, float)) and self.moe_routed_scale > 0):
            raise ValueError(f"{cls}.moe_routed_scale must be > 0, got {self.moe_routed_scale!r}")
        if not self.moe_norm_router_scale > 0:
            raise ValueError(f"{cls}.moe_norm_router_scale must be > 0, got {self.moe_norm_router_scale!r}")
        if self.num_shared_experts and not self.shared_expert_intermediate_size:
            raise ValueError(f"{cls}: num_shared_experts = {self.num_shared_experts} needs a positive "
                             "shared_expert_intermediate_size")
        spec = MOE_ROUTER_SPECS[self.moe_router]
        if spec.fixed_top_k or spec.caps_top_k:
            if self.moe_expert_pool == "global" and self.moe_pool_size < self.num_experts_per_tok:
                raise ValueError(f"{cls}.moe_pool_size ({self.moe_pool_size}) is smaller than num_experts_per_tok "
                                 f"({self.num_experts_per_tok}): the shared pool must hold at least top-k experts")
            if self.num_experts_per_tok > self.num_routed_experts:
                raise ValueError(
                    f"{cls}.num_experts_per_tok ({self.num_experts_per_tok}) is larger than the number of routed "
                    f"experts ({self.num_routed_experts} = {self.num_ffn_experts} FFN + "
                    f"{self.num_zero_computation_experts} zero-computation)"
                )
        if self.moe_load_balance_scope == "pool" and self.moe_expert_pool != "global":
            raise ValueError(f"{cls}.moe_load_balance_scope='pool' needs moe_expert_pool='global' "
                             f"(got {self.moe_expert_pool!r}); use 'layer'")
        self._validate_moe_router_options()
        if (self.moe_tls_coef or self.moe_cls_coef) and MOE_ROUTER_SPECS[self.moe_router].fixed_top_k:
            raise ValueError(f"{cls}: moe_tls_coef / moe_cls_coef are BlockFFN's sparsity losses and need "
                             f"a router with a varying number of experts per token (e.g. moe_router='relu_rmsnorm'), "
                             f"got {self.moe_router!r}")

    def _validate_moe_router_options(self) -> None:
        """The routers' own fields and DynaMoE's capacity schedule (read only when their router is chosen)."""
        cls = type(self).__name__
        spec = MOE_ROUTER_SPECS[self.moe_router]
        for field, allowed in (("moe_router_activation", MOE_ROUTER_ACTIVATIONS), ("moe_dynamic_k", MOE_DYNAMIC_K_RULES),
                               ("moe_capacity_schedule", MOE_CAPACITY_SCHEDULES)):
            if getattr(self, field) not in allowed:
                raise ValueError(f"{cls}.{field} must be one of {allowed}, got {getattr(self, field)!r}")
        for field, minimum in (("moe_sinkhorn_iterations", 1), ("moe_capacity_min", 1), ("moe_pre_gate_hidden", 1)):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                raise ValueError(f"{cls}.{field} must be an integer >= {minimum}, got {value!r}")

        def number(value) -> bool:
            return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

        for field, inside, text in (
            ("moe_sinkhorn_imbalance", lambda v: v >= 1.0, ">= 1 (max expert load over the mean)"),
            ("moe_consistency_coef", lambda v: v >= 0.0, ">= 0"),
            ("moe_router_threshold", lambda v: 0.0 <= v < 1.0, "in [0, 1)"),
            ("moe_dynamic_threshold", lambda v: 0.0 < v <= 1.0, "in (0, 1]"),
            ("moe_router_temperature", lambda v: v > 0.0, "> 0"),
        ):
            value = getattr(self, field)
            if not (number(value) and inside(value)):
                raise ValueError(f"{cls}.{field} must be a number {text}, got {value!r}")
        if self.moe_router == "pre_gated" and self.moe_gating_residual:
            raise ValueError(f"{cls}: moe_router='pre_gated' plans every layer's experts before the layers run, so "
                             "there are no previous-layer logits for moe_gating_residual to add")
        if not spec.balance_loss and self.moe_load_balance_coef:
            raise ValueError(f"{cls}: moe_router={self.moe_router!r} assigns experts at random, so there is no learned "
                             f"routing to balance: set moe_load_balance_coef=0 (got {self.moe_load_balance_coef!r}; "
                             f"moe_preset='thor' does)")
        if self.moe_capacity_schedule != "uniform":
            if not (spec.fixed_top_k or spec.caps_top_k):
                raise ValueError(f"{cls}.moe_capacity_schedule={self.moe_capacity_schedule!r} sets each layer's "
                                 f"experts per token, but moe_router={self.moe_router!r} chooses its own number")
            if self.moe_capacity_min > self.num_experts_per_tok:
                raise ValueError(f"{cls}.moe_capacity_min ({self.moe_capacity_min}) is larger than "
                                 f"num_experts_per_tok ({self.num_experts_per_tok}), the schedule's largest capacity")


def _resolve_mlp_layout(config, mlp_layer_types, sparse_step) -> list[str]:
    """``mlp_layer_types`` from the explicit list, the ``moe_sparse_step`` shorthand or the variant's default."""
    cls, n = type(config).__name__, config.num_hidden_layers
    if mlp_layer_types is not None and sparse_step is not None:
        raise ValueError(f"{cls}: give only one of mlp_layer_types and moe_sparse_step")
    if sparse_step is not None:
        if not isinstance(sparse_step, int) or isinstance(sparse_step, bool) or sparse_step < 1:
            raise ValueError(f"{cls}.moe_sparse_step must be an integer >= 1, got {sparse_step!r}")
        return ["sparse" if (i + 1) % sparse_step == 0 else "dense" for i in range(n)]
    if mlp_layer_types is None:
        return [getattr(config, "default_mlp_layer_type", "dense")] * n
    return list(mlp_layer_types)


def _resolve_layer_layout(config, layer_types, full_attention_layers, linear_to_full_ratio) -> list[str]:
    """``layer_types`` from the explicit list or a shorthand; linear layers become ``hybrid_sliding`` under a hybrid."""
    cls, n = type(config).__name__, config.num_hidden_layers
    if not isinstance(n, int) or n <= 0:
        raise ValueError(f"{cls}.num_hidden_layers must be a positive integer, got {n!r}")
    given = [name for name, value in (("layer_types", layer_types), ("full_attention_layers", full_attention_layers),
                                      ("linear_to_full_ratio", linear_to_full_ratio)) if value is not None]
    if len(given) > 1:
        raise ValueError(f"{cls}: give only one of layer_types, full_attention_layers, linear_to_full_ratio; got {given}")
    default = getattr(config, "default_layer_type", "full_attention")
    if full_attention_layers is not None:
        bad = [i for i in full_attention_layers if not isinstance(i, int) or isinstance(i, bool) or not -n <= i < n]
        if bad:
            raise ValueError(f"{cls}.full_attention_layers names layers {bad} that do not exist "
                             f"(num_hidden_layers = {n}, valid indices 0..{n - 1})")
        chosen = {i % n for i in full_attention_layers}
        layer_types = ["full_attention" if i in chosen else "linear_attention" for i in range(n)]
    elif linear_to_full_ratio is not None:
        r = linear_to_full_ratio
        if not isinstance(r, int) or isinstance(r, bool) or r < 1:
            raise ValueError(f"{cls}.linear_to_full_ratio must be an integer >= 1 (linear layers per full layer), got {r!r}")
        # Qwen3-Next's pattern: r linear layers, then one full-attention layer, repeated.
        layer_types = ["full_attention" if (i + 1) % (r + 1) == 0 else "linear_attention" for i in range(n)]
    elif layer_types is None:
        layer_types = [default] * n
    layer_types = list(layer_types)
    hybrid = getattr(config, "linear_attn_hybrid", "none")
    if hybrid not in (None, "none"):
        kept = "hybrid" if hybrid == "still" else "hybrid_sliding"  # STILL keeps every key; the others a window
        layer_types = [kept if t == "linear_attention" else t for t in layer_types]
    return layer_types


@functools.lru_cache(maxsize=None)
def _declared_defaults(cls) -> dict:
    """Each ``__init__`` argument's default, a subclass's own winning (``GatedDeltaNetConfig``: conv size 4, …)."""
    defaults = {}
    for klass in reversed(cls.__mro__):
        init = klass.__dict__.get("__init__")
        if init is None or klass is object:
            continue
        try:
            parameters = inspect.signature(init).parameters
        except (TypeError, ValueError):
            continue
        defaults.update({name: p.default for name, p in parameters.items() if p.default is not inspect.Parameter.empty})
    return defaults


def _same_value(value, default) -> bool:
    if isinstance(value, (list, tuple)) and isinstance(default, (list, tuple)):  # JSON turns tuples into lists
        return list(value) == list(default)
    return value == default


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _default_head_dim(hidden_size: int, num_attention_heads: int) -> int:
    if not isinstance(num_attention_heads, int) or num_attention_heads <= 0:
        raise ValueError(f"num_attention_heads must be a positive integer, got {num_attention_heads!r}")
    if hidden_size % num_attention_heads != 0:
        raise ValueError(
            f"hidden_size ({hidden_size}) is not divisible by num_attention_heads ({num_attention_heads}); "
            "pass head_dim explicitly if the heads are not meant to tile the hidden size"
        )
    return hidden_size // num_attention_heads


def _layer_types_of_mixers(config, token_mixer_types) -> list[str]:
    """The layer types a layout given as mixers alone gets: each mixer's first declared layer type."""
    unknown = sorted({name for name in token_mixer_types if name not in TOKEN_MIXER_SPECS})
    if unknown:
        raise ValueError(f"{type(config).__name__}.token_mixer_types has unregistered token mixers {unknown}; "
                         f"registered: {tuple(TOKEN_MIXER_SPECS)}")
    return [TOKEN_MIXER_SPECS[name].layer_types[0] for name in token_mixer_types]


def _check_per_layer(config: HfArchConfig, field: str, allowed: tuple[str, ...] | None) -> None:
    """One entry per layer, each in ``allowed`` (None: any non-empty name)."""
    values = getattr(config, field)
    if len(values) != config.num_hidden_layers:
        raise ValueError(
            f"{type(config).__name__}.{field} has {len(values)} entries but num_hidden_layers is "
            f"{config.num_hidden_layers}"
        )
    if allowed is None:
        bad = [v for v in values if not isinstance(v, str) or not v]
        if bad:
            raise ValueError(f"{type(config).__name__}.{field} entries must be registered names, got {bad}")
        return
    unknown = sorted({v for v in values if v not in allowed})
    if unknown:
        raise ValueError(f"{type(config).__name__}.{field} has unsupported entries {unknown}; supported: {allowed}")
