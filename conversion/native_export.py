"""Export to transformers' built-in architectures, so servers that know nothing of hf-arch can run the result.

Today: MoE models (``--to moe`` partitions with or without their shared expert, upcycles, models built with
``MoEConfig``) become ``qwen3_moe`` (with per-head q/k norm, as from Qwen3 sources; no shared expert), ``mixtral``
(every layer sparse, no shared expert, no attention biases) or ``qwen2_moe`` (otherwise: a shared expert, dense
layers listed in ``mlp_only_layers``, q/k/v biases, or top-k weights that are not renormalised). The maths is kept
exactly:

- routers: ``tempered_topk`` weighs the k chosen experts by ``softmax(τ · logits)`` over them, which is the native
  ``softmax(logits')`` over all experts, top-k, renormalised, with ``logits' = (τ W) x``: τ is folded into the router
  rows (selection unchanged for τ > 0); ``softmax_topk`` maps as it is (``norm_topk_prob`` from ours);
- the routed scale multiplies every routed expert's output: folded into the experts' ``down_proj``;
- an always-on shared expert without a gate becomes Qwen2-MoE's gated one with a zero gate (σ(0) = ½) and its
  ``down_proj`` doubled; a model without one gets a one-neuron shared expert of zero weights (qwen2_moe always has
  one); q/k/v without biases get zero biases (qwen2_moe has them).

Anything else is refused before anything is written, naming the first thing in the way: a config field with no
native counterpart (output gates, linear attention, sliding layers, zero-computation experts, gating residuals,
another router, a global expert pool) or a weight the mapping does not consume. Each export is checked as it is
written: the native model's logits (loaded by plain transformers in a fresh process that never imports hf_arch)
against ours, and greedy cached generation.

An all-Gated-DeltaNet model (``mamba_init`` with no kept attention layer) becomes ``qwen3_next`` (every layer
linear, dense MLPs). Its logits match ours to fp32 rounding, but transformers 5.25 cannot run cached generation on a
``qwen3_next`` without any attention layer (its mask creation asks the cache for an attention layer): the record and
the card say so, and Qwen3-Next's own attention layers (gated query, q/k norms) have no exact counterpart in a kept
source layer, so hybrids are refused.

A KDA model in Kimi Linear's layout (Kimi Delta Attention layers with Kimi's options, NoPE MLA layers, dense MLPs)
becomes ``kimi_linear``; an all-KDA linearization too (transformers then cannot run cached generation on it, for the
same reason as qwen3_next). Kimi's sigmoid, bias-corrected, group-limited MoE router is none of ours: sparse layers
are refused.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from ..atomic_io import atomic_output_dir, atomic_write_text

logger = logging.getLogger(__name__)

__all__ = ["NativeExportError", "export_native", "native_kimi_linear_state", "native_moe_state",
           "native_qwen3_next_state", "native_state"]

RECORD_FILE = "hf_arch_native_export.json"
# Fields a native MoE config carries itself (copied), or that only matter in training or bookkeeping.
_STRUCTURAL = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps",
    "tie_word_embeddings", "rope_parameters", "attention_dropout", "pad_token_id", "bos_token_id", "eos_token_id",
)
_HANDLED = (
    "layer_types", "mlp_layer_types", "sliding_window", "attention_bias", "attention_output_bias", "qk_norm",
    "num_experts", "num_experts_per_tok",
    "moe_intermediate_size", "num_shared_experts", "shared_expert_intermediate_size", "shared_expert_gate",
    "moe_router", "moe_routed_scale", "moe_norm_topk_prob", "moe_preset", "moe_sparse_step",
    "moe_pool_size",  # read only with moe_expert_pool="global", which is checked (refused)
    "token_mixer_types", "channel_mixer_types",
    # training only: auxiliary losses and their settings
    "moe_load_balance_coef", "moe_load_balance_scope", "moe_z_loss_coef", "moe_tls_coef", "moe_cls_coef",
    "moe_cls_chunk_size", "moe_zc_balance_weight", "output_router_logits",
)
_BOOKKEEPING = (
    "architectures", "_name_or_path", "transformers_version", "model_type", "dtype", "torch_dtype", "use_cache",
    "id2label", "label2id", "problem_type", "return_dict", "output_attentions", "output_hidden_states",
    "is_encoder_decoder", "chunk_size_feed_forward", "tokenizer_class", "auto_map",
)


class NativeExportError(ValueError):
    """The model is not exactly expressible as a built-in transformers architecture (the message says why)."""


def _refuse(message: str):
    raise NativeExportError(f"cannot export natively: {message}")


def _check_plain(config, handled: tuple[str, ...], native: str) -> None:
    """Every field outside the mapped ones must be what a plain model of the same shape and variant has."""
    given = config.to_dict()
    shape = _STRUCTURAL + ("layer_types", "mlp_layer_types", "sliding_window")
    reference = type(config)(**{k: given[k] for k in shape if k in given})
    plain = reference.to_dict()
    for key, value in given.items():
        if key in _STRUCTURAL or key in handled or key in _BOOKKEEPING or key not in plain:
            continue
        if value != plain[key]:
            _refuse(f"config field {key}={value!r} has no counterpart in {native}")
    if config.hidden_act != "silu":
        _refuse(f"hidden_act={config.hidden_act!r}: {native} is exported with SwiGLU (silu) MLPs")


def _check_config(config) -> None:
    if config.model_type != "hfa_moe":
        _refuse(f"model_type {config.model_type!r} is not an MoE model")
    _check_plain(config, _HANDLED, "transformers' MoE models")
    for i, kind in enumerate(config.layer_types):
        if kind != "full_attention":
            _refuse(f"layer {i}: {kind} (only full softmax attention layers are exported)")
    if config.moe_router not in ("tempered_topk", "softmax_topk"):
        _refuse(f"moe_router={config.moe_router!r}: native routers are softmax top-k")
    if (config.num_shared_experts or 0) > 1:
        _refuse(f"num_shared_experts={config.num_shared_experts}: qwen2_moe has one shared expert")
    if config.norm_placement != "pre":
        _refuse(f"norm_placement={config.norm_placement!r}: mixtral / qwen2_moe / qwen3_moe norm before each branch")
    if config.qk_norm and config.qk_norm_scope != "head":
        _refuse(f"qk_norm_scope={config.qk_norm_scope!r}: qwen3_moe's q/k norms are per head")


def _target(config, has_attention_bias: bool) -> str:
    if config.qk_norm:  # per-head q/k RMSNorm (Qwen3 sources): Qwen3-MoE has it, and no shared expert
        if config.num_shared_experts:
            _refuse("a shared expert with q/k norm: qwen3_moe (the native model with q/k norm) has no shared expert")
        return "qwen3_moe"
    sparse_everywhere = all(kind == "sparse" for kind in config.mlp_layer_types)
    renormalised = config.moe_router == "tempered_topk" or config.moe_norm_topk_prob
    if sparse_everywhere and not config.num_shared_experts and renormalised and not has_attention_bias:
        return "mixtral"
    return "qwen2_moe"


def native_moe_state(model) -> tuple[str, object, dict[str, torch.Tensor]]:
    """``(model_type, native config, native state dict)`` for an hfa_moe model, or :class:`NativeExportError`."""
    from transformers import MixtralConfig, Qwen2MoeConfig, Qwen3MoeConfig

    config = model.config
    _check_config(config)
    state = {k: v.detach() for k, v in model.state_dict().items()}
    used: set[str] = set()

    def take(key: str) -> torch.Tensor:
        used.add(key)
        return state[key]

    L = config.num_hidden_layers
    has_bias = any(f"model.layers.{i}.self_attn.{proj}.bias" in state for i in range(L)
                   for proj in ("q_proj", "k_proj", "v_proj", "o_proj"))
    target = _target(config, has_bias)
    out: dict[str, torch.Tensor] = {"model.embed_tokens.weight": take("model.embed_tokens.weight"),
                                    "model.norm.weight": take("model.norm.weight")}
    if "lm_head.weight" in state:
        out["lm_head.weight"] = take("lm_head.weight")
    shared_width = config.shared_expert_intermediate_size if config.num_shared_experts else 1
    for i in range(L):
        p, q = f"model.layers.{i}.", f"model.layers.{i}."
        for name in ("input_layernorm.weight", "post_attention_layernorm.weight"):
            out[q + name] = take(p + name)
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            weight = take(p + f"self_attn.{proj}.weight")
            out[q + f"self_attn.{proj}.weight"] = weight
            # qwen2_moe: q/k/v always biased; qwen3_moe: all four when any is; zeros where we have none
            biased = (target == "qwen2_moe" and proj != "o_proj") or (target == "qwen3_moe" and has_bias)
            if biased:
                bias_key = p + f"self_attn.{proj}.bias"
                out[q + f"self_attn.{proj}.bias"] = take(bias_key) if bias_key in state else weight.new_zeros(
                    weight.shape[0])
        if target == "qwen3_moe":
            for norm in ("q_norm", "k_norm"):
                out[q + f"self_attn.{norm}.weight"] = take(p + f"self_attn.{norm}.weight")
        if config.mlp_layer_types[i] != "sparse":
            for proj in ("gate_proj", "up_proj", "down_proj"):
                out[q + f"mlp.{proj}.weight"] = take(p + f"mlp.{proj}.weight")
            continue
        router = take(p + "mlp.router.weight")
        if config.moe_router == "tempered_topk":
            temperature = float(take(p + "mlp.router.temperature"))
            if temperature <= 0 and config.num_experts_per_tok < config.num_experts:
                _refuse(f"layer {i}: router temperature {temperature:g} (experts chosen by the logits but weighted "
                        "equally; train the router, or keep every expert active)")
            router = router * temperature
        out[q + "mlp.gate.weight"] = router
        out[q + "mlp.experts.gate_up_proj"] = take(p + "mlp.experts.gate_up_proj")
        out[q + "mlp.experts.down_proj"] = take(p + "mlp.experts.down_proj") * config.moe_routed_scale
        if target in ("mixtral", "qwen3_moe"):
            continue
        if config.num_shared_experts:
            for proj in ("gate_proj", "up_proj"):
                out[q + f"mlp.shared_expert.{proj}.weight"] = take(p + f"mlp.shared_expert.{proj}.weight")
            down = take(p + "mlp.shared_expert.down_proj.weight")
            gate_key = p + "mlp.shared_expert_gate.weight"
            if gate_key in state:
                out[q + "mlp.shared_expert_gate.weight"] = take(gate_key)
            else:  # always on: sigmoid(0) = 1/2, so the doubled down_proj gives the expert's output exactly
                out[q + "mlp.shared_expert_gate.weight"] = down.new_zeros(1, config.hidden_size)
                down = down * 2
            out[q + "mlp.shared_expert.down_proj.weight"] = down
        else:  # qwen2_moe always has a shared expert: one neuron with zero weights adds exactly nothing
            H = config.hidden_size
            out[q + "mlp.shared_expert.gate_proj.weight"] = router.new_zeros(shared_width, H)
            out[q + "mlp.shared_expert.up_proj.weight"] = router.new_zeros(shared_width, H)
            out[q + "mlp.shared_expert.down_proj.weight"] = router.new_zeros(H, shared_width)
            out[q + "mlp.shared_expert_gate.weight"] = router.new_zeros(1, H)
    left = sorted(set(state) - used)
    if left:
        more = f" (and {len(left) - 1} more)" if len(left) > 1 else ""
        _refuse(f"weight {left[0]} has no place in {target}{more}")

    common = {k: getattr(config, k) for k in _STRUCTURAL if hasattr(config, k) and k != "head_dim"}
    common.update(num_experts_per_tok=config.num_experts_per_tok, output_router_logits=False,
                  architectures=None)
    if target == "mixtral":
        native = MixtralConfig(**{**common, "intermediate_size": config.moe_intermediate_size},
                               num_local_experts=config.num_experts, sliding_window=None)
    elif target == "qwen3_moe":
        native = Qwen3MoeConfig(**common, num_experts=config.num_experts,
                                moe_intermediate_size=config.moe_intermediate_size, attention_bias=has_bias,
                                norm_topk_prob=config.moe_router == "tempered_topk" or config.moe_norm_topk_prob,
                                decoder_sparse_step=1, use_sliding_window=False,
                                mlp_only_layers=[i for i, k in enumerate(config.mlp_layer_types) if k != "sparse"])
    else:
        dense = [i for i, kind in enumerate(config.mlp_layer_types) if kind != "sparse"]
        native = Qwen2MoeConfig(**common, num_experts=config.num_experts,
                                moe_intermediate_size=config.moe_intermediate_size,
                                shared_expert_intermediate_size=shared_width,
                                norm_topk_prob=config.moe_router == "tempered_topk" or config.moe_norm_topk_prob,
                                decoder_sparse_step=1, mlp_only_layers=dense, qkv_bias=True,
                                use_sliding_window=False)
    native.head_dim = config.head_dim
    return target, native, out


# What a Gated DeltaNet layer of Qwen3-Next is, in our linear-attention fields (anything else is refused by name).
_QWEN3_NEXT_LINEAR = {
    "linear_attn_type": "gated_deltanet", "linear_attn_gate": "low_rank", "linear_attn_qk_norm": "l2",
    "linear_attn_output_norm": "gated_rmsnorm", "linear_attn_use_rope": False, "linear_attn_hybrid": "none",
    "linear_attn_feature_map": "identity", "linear_attn_normalize": False, "linear_attn_num_sinks": 0,
    "qk_norm": False,
}


def native_qwen3_next_state(model) -> tuple[str, object, dict[str, torch.Tensor]]:
    """An all-Gated-DeltaNet model (``--to gated_deltanet --method mamba_init`` with no kept attention layer) as
    ``qwen3_next``: every layer a Gated DeltaNet with dense SwiGLU MLPs (``mlp_only_layers`` = all).

    Ours shares each k/v head among ``H / H_kv`` q heads before the recurrence; Qwen3-Next's layer has as many key as
    query heads, so k/v projection rows (and their conv channels) are repeated per q head, which is exact. Its
    projections are fused per head (``in_proj_qkvz``: q, k, v, z; ``in_proj_ba``: β logit, decay input) and its
    decoder norms are zero-centred (``1 + w``)."""
    from transformers import Qwen3NextConfig

    config = model.config
    if config.model_type != "hfa_gated_deltanet":
        _refuse(f"model_type {config.model_type!r} is not a Gated DeltaNet model")
    handled = tuple(_QWEN3_NEXT_LINEAR) + ("layer_types", "mlp_layer_types", "linear_attn_conv_size",
                                           "linear_attn_gate_low_rank_dim", "linear_attn_gate_normalizer",
                                           "linear_attn_mix_weights", "moe_intermediate_size", "sliding_window",
                                           "token_mixer_types", "channel_mixer_types", "linear_to_full_ratio",
                                           "full_attention_layers")
    for key, value in _QWEN3_NEXT_LINEAR.items():
        if getattr(config, key) != value:
            _refuse(f"config field {key}={getattr(config, key)!r} (Qwen3-Next's Gated DeltaNet has {value!r})")
    _check_plain(config, handled, "qwen3_next")
    for i, kind in enumerate(config.layer_types):
        if kind != "linear_attention":
            _refuse(f"layer {i}: {kind} (Qwen3-Next's attention layers have a gated query and q/k norms, which a "
                    "kept source layer has not; export all-linear models)")
    for i, kind in enumerate(config.mlp_layer_types):
        if kind != "dense":
            _refuse(f"layer {i}: {kind} MLP (exported as Qwen3-Next dense MLPs only)")
    if not config.linear_attn_conv_size:
        _refuse("linear_attn_conv_size=0: Qwen3-Next's layer has a short convolution")

    state = {k: v.detach() for k, v in model.state_dict().items()}
    used: set[str] = set()

    def take(key: str) -> torch.Tensor:
        used.add(key)
        return state[key]

    H, H_kv, D = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    G = H // H_kv
    out = {"model.embed_tokens.weight": take("model.embed_tokens.weight"),
           "model.norm.weight": take("model.norm.weight") - 1}  # zero-centred: (1 + w)
    if "lm_head.weight" in state:
        out["lm_head.weight"] = take("lm_head.weight")
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        a = p + "self_attn."
        for name in ("input_layernorm.weight", "post_attention_layernorm.weight"):
            out[p + name] = take(p + name) - 1
        for proj in ("gate_proj", "up_proj", "down_proj"):
            out[p + f"mlp.{proj}.weight"] = take(p + f"mlp.{proj}.weight")
        per_head = lambda w, heads: w.reshape(heads, D, -1)  # noqa: E731  [heads*D, X] -> [heads, D, X]
        q = per_head(take(a + "q_proj.weight"), H)
        k = per_head(take(a + "k_proj.weight"), H_kv).repeat_interleave(G, dim=0)  # one key head per q head
        v = per_head(take(a + "v_proj.weight"), H_kv).repeat_interleave(G, dim=0)
        z = per_head(take(a + "output_gate_proj.weight"), H)
        out[a.replace("self_attn", "linear_attn") + "in_proj_qkvz.weight"] = torch.cat([q, k, v, z], 1).reshape(
            4 * H * D, -1)
        b, dec = take(a + "beta_proj.weight"), take(a + "decay_proj.weight")  # [H, hidden] each
        out[a.replace("self_attn", "linear_attn") + "in_proj_ba.weight"] = torch.stack([b, dec], 1).reshape(2 * H, -1)
        conv = take(a + "conv.weight")  # [(H + 2 H_kv) D, K]: q, k, v channels
        cq, ck, cv = conv.split([H * D, H_kv * D, H_kv * D])
        expand = lambda c: c.reshape(H_kv, D, -1).repeat_interleave(G, dim=0).reshape(H * D, -1)  # noqa: E731
        out[a.replace("self_attn", "linear_attn") + "conv1d.weight"] = torch.cat([cq, expand(ck), expand(cv)])[:, None]
        for name, native_name in (("A_log", "A_log"), ("dt_bias", "dt_bias"), ("out_norm.weight", "norm.weight"),
                                  ("o_proj.weight", "out_proj.weight")):
            out[a.replace("self_attn", "linear_attn") + native_name] = take(a + name)
    left = sorted(set(state) - used)
    if left:
        more = f" (and {len(left) - 1} more)" if len(left) > 1 else ""
        _refuse(f"weight {left[0]} has no place in qwen3_next{more}")

    common = {k: getattr(config, k) for k in _STRUCTURAL if hasattr(config, k) and k != "head_dim"}
    native = Qwen3NextConfig(**common, layer_types=["linear_attention"] * config.num_hidden_layers,
                             linear_conv_kernel_dim=config.linear_attn_conv_size, linear_key_head_dim=D,
                             linear_value_head_dim=D, linear_num_key_heads=H, linear_num_value_heads=H,
                             mlp_only_layers=list(range(config.num_hidden_layers)), num_experts=0,
                             head_dim=D, output_router_logits=False)
    return "qwen3_next", native, out


def _kimi_layer_kinds(model) -> list[str]:
    """``"kda"`` / ``"mla"`` per layer, or :class:`NativeExportError` naming the first other mixer."""
    from ..layers.kimi_delta_attention import KimiDeltaAttention
    from ..layers.latent_attention import MultiHeadLatentAttention

    kinds = []
    for i, layer in enumerate(model.model.layers):
        mixer = layer.self_attn
        if isinstance(mixer, KimiDeltaAttention):
            kinds.append("kda")
        elif isinstance(mixer, MultiHeadLatentAttention):
            kinds.append("mla")
        else:
            _refuse(f"layer {i}: {type(mixer).__name__} (kimi_linear's layers are Kimi Delta Attention and NoPE MLA)")
    return kinds


def native_kimi_linear_state(model) -> tuple[str, object, dict[str, torch.Tensor]]:
    """``("kimi_linear", native config, state dict)`` for a KDA model in Kimi Linear's layout: KDA layers with Kimi's
    options, NoPE MLA layers (their latent norms at eps 1e-6, as Kimi's), dense SwiGLU MLPs and plain pre-norms.
    Shared key/value heads (GQA, from a Llama's) are repeated per query head, which is exact.

    Names map key for key except the KDA conv (``conv.weight [3·H·D, K]`` → ``conv1d.weight [3·H·D, 1, K]``) and
    the decay (``f_a_proj``, ``f_b_proj``, ``dt_bias``, ``A_log [H]`` → ``forget_gate.*``, ``A_log [1, 1, H, 1]``)."""
    from transformers import KimiLinearConfig

    from ..layers.kimi_delta_attention import KDAOptions
    from ..layers.latent_attention import MLAOptions
    from ..layers.mixer_registry import mixer_options

    config = model.config
    if config.model_type not in ("hfa_kda", "hfa_hybrid"):
        _refuse(f"model_type {config.model_type!r} is not a KDA model")
    kinds = _kimi_layer_kinds(model)
    H, H_kv, D = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    G = H // H_kv
    if G != 1 and "mla" in kinds:
        _refuse(f"num_key_value_heads={H_kv} with MLA layers (Kimi Linear's MLA takes num_key_value_heads = "
                "num_attention_heads)")
    kda = mixer_options(config, "kda", KDAOptions)
    if kda != KDAOptions(conv_size=kda.conv_size):
        field = next(f for f in ("decay_low_rank_dim", "gate_low_rank_dim", "use_qk_l2norm", "gate_activation",
                                 "gate_lower_bound") if getattr(kda, f) != getattr(KDAOptions(), f))
        _refuse(f"KDA option {field}={getattr(kda, field)!r} (Kimi Linear's is {getattr(KDAOptions(), field)!r})")
    mla = mixer_options(config, "mla", MLAOptions)
    if "mla" in kinds:
        if mla.use_rope:
            _refuse("MLA with use_rope=True (Kimi Linear's MLA is NoPE)")
        eps = config.rms_norm_eps if mla.latent_norm_eps is None else mla.latent_norm_eps
        if eps != 1e-6:
            _refuse(f"MLA latent norm eps {eps:g} (Kimi Linear's latent norms use 1e-6)")
    for i, kind in enumerate(config.mlp_layer_types):
        if kind != "dense":
            _refuse(f"layer {i}: {kind} MLP (Kimi Linear's MoE router, sigmoid scores with a bias correction and "
                    "group-limited top-k, is not one of ours; dense layers only)")
    for key, value in (("qk_norm", False), ("attention_bias", False), ("attention_output_bias", False)):
        if getattr(config, key) != value:
            _refuse(f"config field {key}={getattr(config, key)!r} (Kimi Linear has {value!r})")
    handled = ("layer_types", "mlp_layer_types", "token_mixer_types", "mixer_options", "channel_mixer_types",
               "full_attention_layers", "linear_to_full_ratio", "qk_norm", "attention_bias", "attention_output_bias",
               "sliding_window", "num_experts", "num_experts_per_tok", "moe_intermediate_size", "moe_pool_size",
               "linear_attn_type", "linear_attn_gate", "linear_attn_gate_low_rank_dim",
               "linear_attn_gate_normalizer", "linear_attn_conv_size", "linear_attn_qk_norm",
               "linear_attn_output_norm", "linear_attn_use_rope", "linear_attn_hybrid", "linear_attn_mix_weights",
               "linear_attn_num_sinks", "linear_attn_feature_map", "linear_attn_normalize")
    _check_plain(config, handled, "kimi_linear")

    state = {k: v.detach() for k, v in model.state_dict().items()}
    used: set[str] = set()

    def take(key: str) -> torch.Tensor:
        used.add(key)
        return state[key]

    out = {name: take(name) for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")
           if name in state}
    def per_q_head(rows: torch.Tensor) -> torch.Tensor:
        """``[H_kv·D, X]`` → ``[H·D, X]``: each key/value head repeated for the query heads sharing it (exact: ours
        shares them inside the layer; Kimi's layer has one per query head)."""
        return rows.reshape(H_kv, D, -1).repeat_interleave(G, dim=0).reshape(H * D, -1) if G != 1 else rows

    renamed = {"f_a_proj.weight": "forget_gate.f_a_proj.weight", "f_b_proj.weight": "forget_gate.f_b_proj.weight",
               "dt_bias": "forget_gate.dt_bias"}
    for i, kind in enumerate(kinds):
        p = f"model.layers.{i}."
        a = p + "self_attn."
        for key in [k for k in state if k.startswith(p)]:
            name = key[len(a):] if key.startswith(a) else None
            if name is None:  # norms and the dense MLP: Kimi's names
                out[key] = take(key)
            elif kind == "kda" and name == "conv.weight":  # [q | k | v] channels; shared k/v heads repeated
                cq, ck, cv = take(key).split([H * D, H_kv * D, H_kv * D])
                out[a + "conv1d.weight"] = torch.cat([cq, per_q_head(ck), per_q_head(cv)])[:, None]
            elif kind == "kda" and name in ("k_proj.weight", "v_proj.weight"):
                out[key] = per_q_head(take(key))
            elif kind == "kda" and name == "A_log":
                out[a + "forget_gate.A_log"] = take(key).reshape(1, 1, H, 1)
            elif kind == "kda" and name in renamed:
                out[a + renamed[name]] = take(key)
            else:
                out[key] = take(key)
    left = sorted(set(state) - used)
    if left:
        more = f" (and {len(left) - 1} more)" if len(left) > 1 else ""
        _refuse(f"weight {left[0]} has no place in kimi_linear{more}")

    common = {k: getattr(config, k) for k in _STRUCTURAL
              if hasattr(config, k) and k not in ("head_dim", "rope_parameters", "num_key_value_heads")}
    layer_types = ["linear_attention" if kind == "kda" else "full_attention" for kind in kinds]
    native = KimiLinearConfig(**common, num_key_value_heads=H, layer_types=layer_types,
                              mlp_layer_types=["dense"] * config.num_hidden_layers, linear_head_dim=D,
                              linear_num_heads=H, linear_conv_kernel_dim=kda.conv_size, kv_lora_rank=mla.kv_lora_rank,
                              q_lora_rank=mla.q_lora_rank, qk_nope_head_dim=mla.qk_nope_head_dim,
                              qk_rope_head_dim=mla.qk_rope_head_dim, v_head_dim=mla.v_head_dim,
                              attention_bias=False)
    return "kimi_linear", native, out


def native_state(model) -> tuple[str, object, dict[str, torch.Tensor]]:
    """``(model_type, native config, state dict)`` of the built-in architecture ``model`` is exactly, or
    :class:`NativeExportError` naming what is in the way."""
    model_type = model.config.model_type
    if model_type == "hfa_moe":
        return native_moe_state(model)
    if model_type == "hfa_gated_deltanet":
        return native_qwen3_next_state(model)
    if model_type in ("hfa_kda", "hfa_hybrid"):
        return native_kimi_linear_state(model)
    _refuse(f"model_type {model_type!r}: native export covers MoE models (qwen3_moe / mixtral / qwen2_moe), "
            "all-Gated-DeltaNet models (qwen3_next) and KDA / NoPE-MLA models (kimi_linear) so far")


def _build_native(native_config, state: dict[str, torch.Tensor], dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    extra = {"experts_implementation": "eager"} if _grouped_mm_unaligned(native_config, dtype) else {}
    model = AutoModelForCausalLM.from_config(native_config, dtype=dtype, **extra)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and native_config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"native {native_config.model_type} state mismatch: missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]}")
    if native_config.tie_word_embeddings:
        model.tie_weights()
    return model.eval()


_PLAIN_CHECK = r"""
import json, sys, torch
from transformers import AutoModelForCausalLM
path, ids_path = sys.argv[1], sys.argv[2]
assert not any(name.startswith("hf_arch") for name in sys.modules), "hf_arch was imported"
ids = torch.load(ids_path)
model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
with torch.no_grad():
    logits = model(ids, use_cache=False).logits
    try:
        generated, error = model.generate(ids[:1, :8], max_new_tokens=8, do_sample=False, use_cache=True), None
    except Exception as e:  # reported: e.g. an all-linear qwen3_next, whose mask creation wants an attention layer
        generated, error = None, f"{type(e).__name__}: {e}"
assert not any(name.startswith("hf_arch") for name in sys.modules), "hf_arch was imported"
torch.save({"logits": logits, "generated": generated, "generation_error": error,
            "model_type": model.config.model_type}, ids_path + ".out")
"""


def _check_in_plain_process(path: Path, ours, ids: torch.Tensor) -> dict:
    """Load ``path`` with plain transformers in a fresh interpreter (hf_arch never imported) and compare."""
    ids_path = path.parent / f".{path.name}.check_ids.pt"
    torch.save(ids, ids_path)
    try:
        result = subprocess.run([sys.executable, "-c", _PLAIN_CHECK, str(path), str(ids_path)],
                                capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"plain transformers could not run the export:\n{result.stderr[-2000:]}")
        theirs = torch.load(str(ids_path) + ".out")
    finally:
        ids_path.unlink(missing_ok=True)
        Path(str(ids_path) + ".out").unlink(missing_ok=True)
    with torch.no_grad():
        ours_logits = ours(ids, use_cache=False).logits.float()
        ours_generated = ours.generate(ids[:1, :8], max_new_tokens=8, do_sample=False, use_cache=True)
    record = {"max_abs_logit_diff": float((ours_logits - theirs["logits"].float()).abs().max()),
              "loaded_as": theirs["model_type"]}
    if theirs["generation_error"] is None:
        record["generation_agrees"] = bool(torch.equal(ours_generated, theirs["generated"]))
    else:  # not ours to fix: say so in the record and the card, and warn
        record["generation_agrees"] = None
        record["generation_error_in_transformers"] = theirs["generation_error"][:500]
        logger.warning("plain transformers could not generate from the %s export (%s); its logits match ours",
                       theirs["model_type"], theirs["generation_error"][:200])
    return record


def export_native(model_or_path, out, *, overwrite: bool = False, check: bool = True, tolerance: float = 1e-4,
                  check_tokens: int = 48) -> dict:
    """Write ``out`` as a built-in transformers checkpoint of the same model; returns the record written beside it
    (``model_type``, ``max_abs_logit_diff`` of the reloaded export in a plain process, ``generation_agrees``).

    ``model_or_path``: a loaded hfa_moe model or its directory (then its tokenizer and generation config are copied).
    Refuses (:class:`NativeExportError`) before writing anything when the model is not exactly expressible; fails,
    leaving nothing, when the written checkpoint's logits differ from ours by more than ``tolerance``."""
    from transformers import AutoModelForCausalLM

    import hf_arch  # noqa: F401  (registers hfa_moe)

    source_dir = None
    if isinstance(model_or_path, (str, Path)):
        source_dir = Path(model_or_path)
        model = AutoModelForCausalLM.from_pretrained(source_dir, dtype=torch.float32)
    else:
        model = model_or_path
    model = model.eval()
    target, native_config, state = native_state(model)
    dtype = next(model.parameters()).dtype
    native = _build_native(native_config, state, dtype)
    ids = torch.randint(0, model.config.vocab_size, (2, check_tokens), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        in_memory = float((native(ids, use_cache=False).logits.float() - model(ids, use_cache=False).logits.float())
                          .abs().max())
    if in_memory > tolerance:
        raise RuntimeError(f"native {target} model differs from ours by {in_memory:.3g} (> {tolerance:g}) in logits; "
                           "nothing written")
    record = {"model_type": target, "in_memory_max_abs_logit_diff": in_memory, "source": str(source_dir or ""),
              "loads_with": f"transformers' built-in {target} (no hf-arch, no trust_remote_code)"}
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        native.save_pretrained(tmp)
        unaligned = _grouped_mm_unaligned(native_config, dtype)
        if unaligned:  # transformers' default grouped_mm experts need 16-byte strides: name the eager ones instead
            config_path = tmp / "config.json"
            saved = json.loads(config_path.read_text())
            saved["experts_implementation"] = "eager"
            atomic_write_text(config_path, json.dumps(saved, indent=2) + "\n")
            record["experts_implementation"] = f"eager ({unaligned})"
        if source_dir is not None:
            for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                         "generation_config.json", "chat_template.jinja"):
                if (source_dir / name).is_file():
                    shutil.copy2(source_dir / name, tmp / name)
        if check:
            reference = model.float() if dtype != torch.float32 else model
            record.update(_check_in_plain_process(tmp, reference, ids))
            if record["max_abs_logit_diff"] > tolerance or record["generation_agrees"] is False:
                raise RuntimeError(f"the written {target} checkpoint does not reproduce ours: {record}; "
                                   "nothing written")
        atomic_write_text(tmp / RECORD_FILE, json.dumps(record, indent=2) + "\n")
        atomic_write_text(tmp / "README.md", _card(target, record))
    logger.info("exported %s as %s: %s", source_dir or "the model", target, record)
    return record


def _grouped_mm_unaligned(native_config, dtype: torch.dtype) -> str | None:
    """Why transformers' grouped_mm experts cannot run this checkpoint (torch's grouped GEMM wants every row stride a
    multiple of 16 bytes; transformers 5.25 checks only the pointers), or None."""
    width = getattr(native_config, "moe_intermediate_size", None)
    if width is None and native_config.model_type == "mixtral":
        width = native_config.intermediate_size
    if width is None:
        return None
    size = torch.tensor([], dtype=dtype).element_size()
    for name, value in (("expert width", width), ("hidden size", native_config.hidden_size)):
        if value * size % 16:
            return f"{name} {value} x {size} bytes is not a multiple of 16"
    return None


# Servers known (late 2025) to list each architecture; a card names them so users know where the export runs.
_KNOWN_RUNTIMES = {
    "mixtral": "vLLM, SGLang, TGI, llama.cpp (after GGUF conversion)",
    "qwen2_moe": "vLLM, SGLang, llama.cpp (after GGUF conversion)",
    "qwen3_moe": "vLLM, SGLang, llama.cpp (after GGUF conversion)",
    "qwen3_next": "vLLM, SGLang",
    "kimi_linear": "vLLM",
}


def _card(target: str, record: dict) -> str:
    diff = record.get("max_abs_logit_diff", record["in_memory_max_abs_logit_diff"])
    agrees = record.get("generation_agrees", True)
    generation = {True: "greedy cached generation identical", False: "greedy cached generation DIFFERENT",
                  None: "cached generation could not run in this transformers release: "
                        + record.get("generation_error_in_transformers", "")}[agrees]
    runtimes = "known to list it: " + _KNOWN_RUNTIMES[target] if target in _KNOWN_RUNTIMES else "no server list known"
    return (f"# Native `{target}` export\n\nWritten by `hf-arch export --native` from an hf-arch model: a plain "
            f"transformers `{target}` checkpoint, loaded without hf-arch or `trust_remote_code` "
            f"(`AutoModelForCausalLM.from_pretrained`); servers that implement `{target}` load it as they load that "
            f"family's own checkpoints ({runtimes}; check your server's supported-model list for its version). "
            f"Checked when written: max |Δlogit| {diff:.2e} against the hf-arch model "
            f"(fp32, reloaded in a process without hf-arch); {generation}.\n")
