"""The one backbone every variant shares.

embeddings → N × (norm → token mixer → residual → norm → channel mixer → residual) → norm → head.
Which mixer a layer gets comes from ``config.layer_types`` / ``config.mlp_layer_types``; a variant is a config
subclass plus thin subclasses of the classes below that only set ``config_class``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicCache, StaticCache
from transformers.generation import GenerationMixin
from transformers.masking_utils import (
    create_causal_mask,
    create_sliding_window_causal_mask,
)
from transformers.modeling_layers import (
    GenericForSequenceClassification,
    GradientCheckpointingLayer,
)
from transformers.modeling_outputs import (
    BaseModelOutputWithPast,
    CausalLMOutputWithPast,
    MoeCausalLMOutputWithPast,
    MoeModelOutputWithPast,
)
from transformers.modeling_utils import PreTrainedModel

from ..configuration import (
    LINEAR_LAYER_TYPES,
    HfArchConfig,
    attention_kernel_conflicts,
    attention_needs_padding_mask,
)
from ..layers.attention import HfArchAttention
from ..layers.auxiliary import AUXILIARY_FIELDS, check_sparse_attention_mode, split_mixer_result
from ..layers.geonorm import GeodesicUpdate, project_to_sphere
from ..layers.latent_attention import MultiHeadLatentAttention
from ..layers.linear_attention import HfArchLinearAttention, cached_token_count
from ..layers.mixer_registry import build_channel_mixer, build_token_mixer
from ..layers.mlp import HfArchMLP
from ..layers.moe import HfArchMoE
from ..layers.moe_experts import HfArchExperts
from ..layers.moe_losses import consistency_loss, consistency_regularised, moe_auxiliary_losses
from ..layers.norm import HfArchRMSNorm
from ..layers.output_gate import AttentionOutputGate
from ..layers.pre_gate import ReadMePreGate
from ..layers.rope import build_rotary_embedding
from ..layers.sparse_attention import HfArchSparseAttention, sparse_attention_auxiliary_loss
from ..layers.value_bank import ValueBank
from .cache_names import CACHE_OUTPUT_FIELD, MASK_CACHE_ARGUMENT, cache_output, resolve_cache


@dataclass
class MixerReports:
    """What the token mixers reported this forward (``layers.auxiliary``), one entry
    per reporting layer in layer order (None where no layer reported):

    - ``transfer_losses``: per linear layer with ``attention_transfer=True``, ``MSE(linear output, softmax teacher)``;
    - ``gate_losses``: per seer layer (in training or ``sparse_attention_mode="gate_distillation"``), the gate's KL;
    - ``sparse_probabilities`` / ``sparse_choices``: per flux layer, ``[B]`` P(sparse) and the branch taken;
    - ``sparse_block_counts``: per seer layer that prefilled sparsely, ``[2]`` (computed, causal) blocks;
    - ``sparse_attention_loss``: what a loss adds for sparse attention (mean gate KL, and in training the flux
      Lagrangian), already included in a causal LM's ``loss`` when labels are given;
    - ``compute_losses``: per channel mixer that prices its compute (ACM with ``compute_loss_weight``, in training),
      the weighted expected share of its units that run; ``compute_loss`` their mean, included in ``loss`` likewise;
    - ``token_selections`` / ``attended_counts``: per DELTA selection layer, ``[B, T, S]`` the keys each query keeps;
      per DELTA selection / sparse layer, ``[2]`` (keys attended, keys in the causal context).
    """

    transfer_losses: tuple[torch.Tensor, ...] | None = None
    gate_losses: tuple[torch.Tensor, ...] | None = None
    sparse_probabilities: tuple[torch.Tensor, ...] | None = None
    sparse_choices: tuple[torch.Tensor, ...] | None = None
    sparse_block_counts: tuple[torch.Tensor, ...] | None = None
    sparse_attention_loss: torch.Tensor | None = None
    compute_losses: tuple[torch.Tensor, ...] | None = None
    compute_loss: torch.Tensor | None = None
    token_selections: tuple[torch.Tensor, ...] | None = None
    attended_counts: tuple[torch.Tensor, ...] | None = None


# The token mixers' reports after the base output's own fields (a mixin listed first: dataclasses order fields from
# the last base to the first, and a model output's positional order must start with transformers' fields).
@dataclass
class HfArchModelOutputWithPast(MixerReports, BaseModelOutputWithPast):
    """``BaseModelOutputWithPast`` plus the token mixers' reports (``MixerReports``)."""


@dataclass
class HfArchMoeModelOutputWithPast(MixerReports, MoeModelOutputWithPast):
    """``MoeModelOutputWithPast`` plus the token mixers' reports (``MixerReports``)."""


@dataclass
class HfArchCausalLMOutputWithPast(MixerReports, CausalLMOutputWithPast):
    """``CausalLMOutputWithPast`` plus the token mixers' reports (``MixerReports``)."""


@dataclass
class HfArchMoeCausalLMOutputWithPast(MixerReports, MoeCausalLMOutputWithPast):
    """``MoeCausalLMOutputWithPast`` plus the token mixers' reports (``MixerReports``)."""


# The output fields above that the backbone fills and the heads pass on.
AUXILIARY_OUTPUT_FIELDS = (*AUXILIARY_FIELDS.values(), "sparse_attention_loss", "compute_loss")


def auxiliary_outputs(outputs) -> dict:
    """``{field: value}`` of the mixers' reports in a backbone output, for a head's output."""
    return {name: getattr(outputs, name, None) for name in AUXILIARY_OUTPUT_FIELDS}


# The built-in mixers, imported for their registration (``@register_token_mixer`` / ``@register_channel_mixer``); the
# decoder layer builds whatever the registries hold.
BUILTIN_MIXERS = (HfArchAttention, HfArchSparseAttention, HfArchLinearAttention, MultiHeadLatentAttention, HfArchMLP,
                  HfArchMoE)


class _CountsTokensOnAnyLayout:
    """``get_seq_length()`` that counts tokens whatever layer 0 is: all-linear models (transformers counts attention
    layers only; 5.17 raises) and hybrids whose first layer is linear; generate() calls it during prefill."""

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return cached_token_count(self) if layer_idx == 0 else super().get_seq_length(layer_idx)


class HfArchStaticCache(_CountsTokensOnAnyLayout, StaticCache):
    """transformers' ``StaticCache`` (what ``cache_implementation="static"`` builds), counting tokens on any layout."""


class HfArchCache(_CountsTokensOnAnyLayout, DynamicCache):
    """``DynamicCache`` whose ``get_seq_length()`` counts tokens whatever layer 0 is: all-linear models (transformers
    counts attention layers only) and hybrids whose first layer is linear; generate() calls it during prefill. (GDA
    layers extend their own cache layer on first use, in this cache as in any other.)"""

    @property
    def is_croppable(self) -> bool:
        """Our linear mixers keep only the state after a whole forward, not one per token, so a rollback to a point
        inside a verified draft (assisted decoding) cannot be exact: say so, and generate() refuses by name."""
        if any(hasattr(layer, "recurrent_states") for layer in self.layers):
            return False
        return all(getattr(layer, "is_croppable", True) for layer in self.layers)

    def crop(self, *args, **kwargs) -> None:
        """Refused by name where it cannot be exact (releases before 5.25 crop without asking ``is_croppable``)."""
        if not self.is_croppable:
            raise ValueError("Assisted decoding (and any rollback of the cache) needs a cache that can be cropped: this "
                             "model's linear-attention layers keep one state per forward, not one per token")
        super().crop(*args, **kwargs)


def new_cache(config: HfArchConfig) -> DynamicCache:
    """The cache a forward or generate() starts: transformers' own ``DynamicCache`` (GDA layers add their noise-key
    companion on first use), or ``HfArchCache`` where linear layers need its token count and rollback refusal."""
    if any(t in LINEAR_LAYER_TYPES for t in config.layer_types):
        return HfArchCache(config=config)
    return DynamicCache(config=config)


class HfArchDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: HfArchConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_type = config.layer_types[layer_idx]
        # Whose RoPE this layer takes when it differs per layer type (a linearized layer keeps its source's).
        rope_types = getattr(config, "rope_layer_types", None)
        self.rope_layer_type = rope_types[layer_idx] if rope_types else self.layer_type
        # The norms of config.norm_placement under the names each family's checkpoints use, so they map key for key:
        # pre (Llama): input_layernorm before the mixer, post_attention_layernorm before the MLP; post (OLMo-2):
        # post_attention_layernorm on the mixer's output, post_feedforward_layernorm on the MLP's; sandwich (Gemma):
        # input_layernorm, post_attention_layernorm (on the output), pre_feedforward_layernorm, post_feedforward_layernorm.
        self.norm_placement = placement = getattr(config, "norm_placement", "pre")

        def norm():
            return HfArchRMSNorm(config.hidden_size, eps=config.rms_norm_eps,
                                 weight_offset=getattr(config, "norm_weight_offset", 0.0))

        self.input_layernorm = norm() if placement != "post" else None
        self.self_attn = build_token_mixer(config, layer_idx)
        self.post_attention_layernorm = norm()
        self.pre_feedforward_layernorm = norm() if placement == "sandwich" else None
        self.post_feedforward_layernorm = norm() if placement != "pre" else None
        self.mlp = build_channel_mixer(config, layer_idx)
        # GeoNorm: each branch moves the (spherical) hidden state along a geodesic instead of adding to it.
        geodesic = config.residual_update == "geodesic"
        self.attn_update = GeodesicUpdate(config, layer_idx) if geodesic else None
        self.mlp_update = GeodesicUpdate(config, layer_idx) if geodesic else None

    @property
    def mlp_input_norm(self) -> nn.Module | None:
        """The RMSNorm the MLP's input goes through (None under post norms: the residual stream itself)."""
        if self.norm_placement == "pre":
            return self.post_attention_layernorm
        return self.pre_feedforward_layernorm

    def _residual(self, update: GeodesicUpdate | None, hidden_states: torch.Tensor, mixed: torch.Tensor) -> torch.Tensor:
        return hidden_states + mixed if update is None else update(hidden_states, mixed)

    def forward(
        self,
        hidden_states: torch.Tensor,
        previous_router_logits: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        past_key_values: Cache | None = None,
        expert_pool: nn.Module | None = None,
        cache: Cache | None = None,
        token_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> tuple:
        """Returns ``(hidden states, attention weights, router logits [B, T, E] of a sparse layer or None,
        auxiliary keys, *auxiliary values)``: the token mixer's auxiliary outputs (``layers.auxiliary``: training
        terms and measurements), their keys as a tuple of names and the tensors after it, flat.

        ``previous_router_logits`` is positional so gradient checkpointing carries its gradient (gating residuals).
        The cache comes as ``cache`` or ``past_key_values`` (transformers' old and new names). ``token_mask``: the
        2-D padding mask, for a sparse layer's routing statistics. Modes for the mixers (``attention_transfer``,
        ``sparse_attention_mode``) come in ``kwargs``."""
        past_key_values = resolve_cache(cache, past_key_values)
        residual = hidden_states
        mixed, attn_weights, auxiliary = split_mixer_result(self.self_attn(
            self.input_layernorm(hidden_states) if self.input_layernorm is not None else hidden_states,
            position_embeddings=position_embeddings,
            attention_mask=attention_mask,
            past_key_values=past_key_values,
            **kwargs,
        ))
        pre = self.norm_placement == "pre"
        if not pre:
            mixed = self.post_attention_layernorm(mixed)
        hidden_states = self._residual(self.attn_update, residual, mixed)
        if pre:
            normed = self.post_attention_layernorm(hidden_states)
        elif self.pre_feedforward_layernorm is not None:
            normed = self.pre_feedforward_layernorm(hidden_states)
        else:
            normed = hidden_states
        router_logits = None
        if self.mlp.routes_tokens:
            mixed, router_logits = self.mlp(normed, previous_router_logits, expert_pool, token_mask)
        elif getattr(self.mlp, "reports_auxiliary", False):  # a channel mixer with training terms (ACM's price)
            mixed, report = self.mlp(normed)
            auxiliary = {**auxiliary, **split_mixer_result((mixed, None, report))[2]}  # unknown keys refused by name
        else:
            mixed = self.mlp(normed)
        if self.post_feedforward_layernorm is not None:
            mixed = self.post_feedforward_layernorm(mixed)
        # The mixer's training terms leave as outputs, not attributes, and flat (not in a dict): a (reentrant)
        # checkpointed layer only carries gradients through the tensors it returns.
        return (self._residual(self.mlp_update, hidden_states, mixed), attn_weights, router_logits, tuple(auxiliary),
                *auxiliary.values())


class HfArchPreTrainedModel(PreTrainedModel):
    config_class = HfArchConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["HfArchDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_sdpa = True
    _supports_attention_backend = True
    _can_compile_fullgraph = True
    # Read by peft_utils: Flux's Lagrange multipliers (model.sparsity_multipliers) are new parameters.
    new_parameters = ("sparsity_multipliers",)

    class _SupportedByConfig:
        """``_supports_flash_attn`` / ``_supports_flex_attn`` from what the config builds, not from the class: flash and
        flex kernels cannot run SA-Softmax / KRR scores, differential noise maps or simulated heads, whichever variant
        turns them on (``configuration.attention_kernel_conflicts``). On the class: what its default config builds."""

        def __set_name__(self, owner, name):
            self.name = name

        def __get__(self, model, owner):
            config = model.__dict__.get("config") if model is not None else None
            if config is None:
                cached = owner.__dict__.get("_default_attention_kernel_conflicts")
                if cached is None:
                    cached = attention_kernel_conflicts(owner.config_class())
                    setattr(owner, "_default_attention_kernel_conflicts", cached)
                return not cached
            return not attention_kernel_conflicts(config)

    _supports_flash_attn = _SupportedByConfig()
    _supports_flex_attn = _SupportedByConfig()

    def _check_and_adjust_attn_implementation(self, attn_implementation, *args, **kwargs):
        """Refuse flash / flex kernels by the feature that rules them out, before transformers' generic "does not
        support Flash Attention" (or a missing-package error) hides why."""
        if isinstance(attn_implementation, str) and ("flash" in attn_implementation or "flex" in attn_implementation):
            conflicts = attention_kernel_conflicts(self.config)
            if conflicts:
                raise ValueError(
                    f"{type(self).__name__} ({self.config.model_type}): attn_implementation={attn_implementation!r} "
                    f"cannot run this config's attention: {'; '.join(conflicts)}. Use attn_implementation='sdpa' or "
                    "'eager'."
                )
        return super()._check_and_adjust_attn_implementation(attn_implementation, *args, **kwargs)

    def __init__(self, config: HfArchConfig, *inputs, **kwargs) -> None:
        super().__init__(config, *inputs, **kwargs)
        # Linear layers carry a recurrent state that cannot be rolled back token by token (no assisted decoding).
        self._is_stateful = any(t in LINEAR_LAYER_TYPES for t in config.layer_types)

    def _wants_dict(self, return_dict: bool | None) -> bool:
        return self.config.return_dict if return_dict is None else return_dict

    @staticmethod
    def _add_mixer_losses(loss: torch.Tensor, backbone_output) -> torch.Tensor:
        """A task loss plus the mixers' own terms of the same forward (the backbone output's ``sparse_attention_loss``:
        seer gate self-distillation, in training the flux Lagrangian; ``compute_loss``: ACM's compute price), so their
        parameters learn from the loss the model returns (as the MoE router's aux loss)."""
        for name in ("sparse_attention_loss", "compute_loss"):
            term = getattr(backbone_output, name, None)
            if term is not None:
                loss = loss + term.to(loss.device)
        return loss

    def save_pretrained(self, save_directory, *args, remote_code: bool = True, **kwargs):
        """``PreTrainedModel.save_pretrained``, then the flat remote-code files and the ``auto_map`` in the same directory
        (the package's ``remote_code.export_remote_code``), as ``register_for_auto_class`` does for custom models: every
        save (Trainer checkpoints, ``push_to_hub``) then loads with ``trust_remote_code=True`` where the package is not
        installed. Only the process that writes the checkpoint writes them (``is_main_process``, torch.distributed rank
        0). ``remote_code=False`` leaves them out; adapter-only saves and unregistered model types add nothing, nor does
        this class where it was itself loaded from those files (transformers copies them on save)."""
        import importlib
        import inspect
        import os

        bound = inspect.signature(PreTrainedModel.save_pretrained).bind(self, save_directory, *args, **kwargs)
        should_save = getattr(self, "should_save_on_this_rank", lambda is_main_process: is_main_process)
        package, _, module = __name__.partition(".")  # in the flat remote-code file: no package module to call
        exporter = None
        if remote_code and module == "models.backbone" and should_save(bound.arguments.get("is_main_process", True)) \
                and not getattr(self, "_hf_peft_config_loaded", False):
            exporter = importlib.import_module(f"{package}.remote_code")
        if exporter is None or self.config.model_type not in {v.model_type for v in exporter.VARIANTS.values()}:
            return super().save_pretrained(save_directory, *args, **kwargs)
        if not bound.arguments.get("push_to_hub", False):
            result = super().save_pretrained(save_directory, *args, **kwargs)
            if os.path.isdir(save_directory):  # for a file path the parent only logs an error
                exporter.export_remote_code(save_directory)
            return result
        upload = self._upload_modified_files  # the parent uploads before it returns: write the files just before

        def upload_with_remote_code(working_dir, *upload_args, **upload_kwargs):
            exporter.export_remote_code(working_dir)
            return upload(working_dir, *upload_args, **upload_kwargs)

        self._upload_modified_files = upload_with_remote_code
        try:
            return super().save_pretrained(save_directory, *args, **kwargs)
        finally:
            del self._upload_modified_files

    def _init_weights(self, module: nn.Module) -> None:
        """transformers' init, then ``module.init_parameters(init)`` where the module holds parameters of its own
        (mixers, routers, gates, convs: each declares its initialisation; the one path for built-in and registered
        modules; a container's method, if any, is for conversions that initialise a whole new layer)."""
        super()._init_weights(module)
        if module._parameters and callable(getattr(module, "init_parameters", None)):
            from transformers import initialization

            module.init_parameters(initialization)
        if isinstance(module, HfArchModel) and module.sparsity_multipliers is not None:
            nn.init.zeros_(module.sparsity_multipliers)
        if isinstance(module, nn.Linear) and hasattr(module, "output_gate_last"):
            AttentionOutputGate.init_linear(
                module,
                self.config.attn_output_gate_init,
                std=self.config.initializer_range,
                bias_init=self.config.attn_output_gate_bias_init,
            )


class HfArchModel(HfArchPreTrainedModel):
    def __init__(self, config: HfArchConfig) -> None:
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(HfArchDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = HfArchRMSNorm(config.hidden_size, eps=config.rms_norm_eps,
                                  weight_offset=getattr(config, "norm_weight_offset", 0.0))
        self.rotary_emb = build_rotary_embedding(config)
        # UniPool: one set of FFN experts that every sparse layer routes into (each with its own router).
        self.expert_pool = (
            HfArchExperts(config, config.moe_pool_size)
            if "sparse" in config.mlp_layer_types and config.moe_expert_pool == "global" else None
        )
        # Read-ME: one router, decoupled from the layers, plans every sparse layer's experts from the embeddings.
        self.pre_gate = (ReadMePreGate(config)
                         if "sparse" in config.mlp_layer_types and config.moe_router == "pre_gated" else None)
        # MoVE: one bank of value embeddings that every attention layer mixes into its values.
        self.value_bank = ValueBank(config) if config.move_num_slots else None
        # Flux: the Lagrange multipliers of the sparsity target (trained by gradient ascent; unused at inference).
        self.sparsity_multipliers = nn.Parameter(torch.zeros(2)) if config.sparse_attn_method == "flux" else None
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def _embed(self, input_ids: torch.LongTensor) -> torch.Tensor:
        embeddings = self.embed_tokens(input_ids)
        multiplier = getattr(self.config, "embedding_multiplier", None)
        if multiplier is not None:  # Gemma: √hidden, as a tensor of the weights' dtype
            embeddings = embeddings * torch.tensor(multiplier, dtype=embeddings.dtype)
        return embeddings

    @torch.no_grad()
    def plan_experts(self, input_ids: torch.LongTensor | None = None,
                     inputs_embeds: torch.Tensor | None = None) -> dict[int, torch.LongTensor]:
        """Read-ME (``moe_router='pre_gated'``): ``{layer index: [B, T, k] expert ids, best first}`` for every
        sparse layer, from the tokens alone, without running the layers (what the forward will use)."""
        if self.pre_gate is None:
            raise ValueError(f"plan_experts needs moe_router='pre_gated' (Read-ME's decoupled router); this model's "
                             f"router is {getattr(self.config, 'moe_router', None)!r}, which routes inside each layer")
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds")
        logits = self.pre_gate(self._embed(input_ids) if inputs_embeds is None else inputs_embeds)
        return {layer: logits[:, :, s].topk(self.layers[layer].mlp.top_k, dim=-1).indices
                for s, layer in enumerate(self.pre_gate.sparse_layers)}

    def _layer_masks(self, inputs_embeds, attention_mask, past_key_values, position_ids) -> dict:
        """One mask per attention layer type, built by transformers for the active attention backend."""
        if isinstance(attention_mask, dict):  # already prepared (e.g. by generate)
            return attention_mask
        mask_kwargs = dict(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            **{MASK_CACHE_ARGUMENT: past_key_values},
        )
        # Linear layers take the 2-D padding mask itself (they zero padded tokens out of their states).
        padding = attention_mask if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2 else None
        masks = {layer_type: padding for layer_type in LINEAR_LAYER_TYPES}
        if "full_attention" in self.config.layer_types:
            masks["full_attention"] = create_causal_mask(**mask_kwargs)
        if "sliding_attention" in self.config.layer_types:
            masks["sliding_attention"] = create_sliding_window_causal_mask(**mask_kwargs)
        return masks

    def _packed_sequences(self, position_ids, attention_mask, past_seen, kwargs) -> torch.LongTensor | None:
        """``cu_seqlens`` of packed training rows (B = 1, no padding mask, positions restarting at 0), else None.

        Explicit flash-attention-style ``cu_seq_lens_q`` (transformers' DataCollatorWithFlattening) wins.
        Softmax attention through a backend finds the packing in its mask; linear layers and the mixers that read
        positions themselves (score ops, affine means, sparse attention) need the boundaries.
        """
        if not (any(t in LINEAR_LAYER_TYPES for t in self.config.layer_types)
                or attention_needs_padding_mask(self.config)):
            return None
        explicit = kwargs.get("cu_seq_lens_q")
        if explicit is not None:
            return explicit.to(torch.long)
        if position_ids is None or position_ids.shape[0] != 1 or past_seen or attention_mask is not None:
            return None
        starts = (position_ids[0] == 0).nonzero().flatten()
        if starts.numel() <= 1:
            return None
        T = position_ids.shape[1]
        bounds = torch.cat([starts, starts.new_tensor([T])])
        if bounds[0] != 0:
            bounds = torch.cat([bounds.new_zeros(1), bounds])
        return bounds.to(torch.long)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        cache: Cache | None = None,
        attention_transfer: bool = False,
        sparse_attention_mode: str | None = None,
        **kwargs,
    ) -> HfArchModelOutputWithPast | HfArchMoeModelOutputWithPast:
        """The cache comes as ``cache`` (transformers >= 5.25) or ``past_key_values``; it is returned in the field the
        installed transformers declares.

        Modes for training and measurement, passed to every token mixer (``layers.auxiliary``):
        ``attention_transfer=True`` makes linear-attention layers return their softmax teacher (the source layer's
        function) and report ``MSE(linear, teacher)`` in ``transfer_losses`` (no cache: ``use_cache=False``);
        ``sparse_attention_mode="dense"`` runs sparse-attention layers densely (the base model's function),
        ``"gate_distillation"`` also makes seer layers report their gate's KL in ``gate_losses``."""
        past_key_values = resolve_cache(cache, past_key_values, public=True)
        check_sparse_attention_mode(sparse_attention_mode)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if self.training and past_key_values is None:
            # Nothing decodes during training; without a cache, transformers' masks also recognise packed rows.
            use_cache = False
        output_attentions = self.config.output_attentions if output_attentions is None else output_attentions
        output_hidden_states = (
            self.config.output_hidden_states if output_hidden_states is None else output_hidden_states
        )
        if inputs_embeds is None:
            inputs_embeds = self._embed(input_ids)
        if use_cache and past_key_values is None:
            past_key_values = new_cache(self.config)
        past_seen = cached_token_count(past_key_values)
        # Packed rows show in the caller's position_ids only (a forward that made its own has nothing to detect).
        packed_positions = position_ids
        if position_ids is None:
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device).unsqueeze(0) + past_seen
        cu_seqlens = self._packed_sequences(packed_positions, attention_mask, past_seen, kwargs)

        masks = self._layer_masks(inputs_embeds, attention_mask, past_key_values, position_ids)
        hidden_states = project_to_sphere(inputs_embeds) if self.config.residual_update == "geodesic" else inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids)
        if self.value_bank is not None:
            kwargs["value_bank"] = self.value_bank
        if attention_needs_padding_mask(self.config):  # these mixers read the 2-D padding mask themselves
            kwargs["padding_mask"] = attention_mask if isinstance(attention_mask, torch.Tensor) and \
                attention_mask.dim() == 2 else None
        # Modes reach the mixers only when set (a mixer that knows none of them sees nothing new).
        if attention_transfer:
            kwargs["attention_transfer"] = True
        if sparse_attention_mode is not None:
            kwargs["sparse_attention_mode"] = sparse_attention_mode
        all_hidden_states, all_attentions, all_router_logits = [], [], []
        reported = {key: [] for key in AUXILIARY_FIELDS}  # the mixers' auxiliary outputs, per key in layer order
        router_logits = None
        # Read-ME: every sparse layer's logits, planned from the embeddings, reach each layer in place of the
        # previous layer's (pre-gated routers have no gating residual).
        planned = self.pre_gate(inputs_embeds) if self.pre_gate is not None else None
        planned_slot = {layer: s for s, layer in enumerate(self.pre_gate.sparse_layers)} if planned is not None else {}
        selection = {}  # DELTA: the latest selection layer's choice, for the layers after it that read one
        for index, layer in enumerate(self.layers):
            if output_hidden_states:
                all_hidden_states.append(hidden_states)
            hidden_states, attn_weights, layer_router_logits, auxiliary_keys, *auxiliary_values = layer(
                hidden_states,
                planned[:, :, planned_slot[index]] if index in planned_slot else router_logits,
                attention_mask=masks.get(layer.layer_type),
                expert_pool=self.expert_pool,
                token_mask=attention_mask if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2
                else None,
                # One (cos, sin) for every layer, or per layer type (linear layers take the full-attention one).
                position_embeddings=position_embeddings if not isinstance(position_embeddings, dict) else
                position_embeddings.get(layer.rope_layer_type, position_embeddings.get("full_attention")),
                past_key_values=past_key_values,
                position_ids=position_ids,
                cu_seqlens=cu_seqlens,
                position_in_sequence=position_ids if cu_seqlens is not None else None,
                output_attentions=output_attentions,
                **(selection if getattr(layer.self_attn, "reads_token_selection", False) else {}),
                **kwargs,
            )
            # One map per attention layer; linear layers have none (transformers' convention for hybrids).
            if output_attentions and layer.layer_type not in LINEAR_LAYER_TYPES:
                all_attentions.append(attn_weights)
            if layer_router_logits is not None:
                router_logits = layer_router_logits
                all_router_logits.append(layer_router_logits)
            for key, value in zip(auxiliary_keys, auxiliary_values):
                reported[key].append(value)
                if key == "token_selection":
                    selection = {"token_selection": value}
        auxiliary = {AUXILIARY_FIELDS[key]: tuple(values) for key, values in reported.items() if values}
        auxiliary["sparse_attention_loss"] = sparse_attention_auxiliary_loss(
            reported["gate_loss"], reported["sparse_probability"] if self.training else [], self.sparsity_multipliers,
            self.config.sparse_attn_target_sparsity)
        if reported["compute_loss"]:
            auxiliary["compute_loss"] = torch.stack(reported["compute_loss"]).mean()
        hidden_states = self.norm(hidden_states)
        if output_hidden_states:
            all_hidden_states.append(hidden_states)
        if all_router_logits:
            output = HfArchMoeModelOutputWithPast(
                last_hidden_state=hidden_states,
                **cache_output(past_key_values if use_cache else None),
                hidden_states=tuple(all_hidden_states) if output_hidden_states else None,
                attentions=tuple(all_attentions) if output_attentions else None,
                router_logits=tuple(all_router_logits),
                **auxiliary,
            )
        else:
            output = HfArchModelOutputWithPast(
                last_hidden_state=hidden_states,
                **cache_output(past_key_values if use_cache else None),
                hidden_states=tuple(all_hidden_states) if output_hidden_states else None,
                attentions=tuple(all_attentions) if output_attentions else None,
                **auxiliary,
            )
        return output if self._wants_dict(return_dict) else output.to_tuple()


class HfArchForCausalLM(HfArchPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    model_class = HfArchModel

    def __init__(self, config: HfArchConfig) -> None:
        super().__init__(config)
        self.model = self.model_class(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        """generate() builds a plain DynamicCache: models with linear layers get ours (same layers: a token count on any
        layout, rollback refused by name); a static cache counts tokens on any layout too."""
        result = super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
        for name in ("cache", "past_key_values"):  # the name generate() uses depends on the transformers release
            cache = model_kwargs.get(name)
            if type(cache) is StaticCache and not getattr(cache, "_is_user_defined", False):
                # In place, not a new object: generate() keeps this cache between calls to avoid recompiling.
                cache.__class__ = HfArchStaticCache  # adds no state, only the token count
                continue
            linear = any(t in LINEAR_LAYER_TYPES for t in self.config.layer_types)
            if linear and type(cache) is DynamicCache and not getattr(cache, "_is_user_defined", False):
                if all(not getattr(layer, "is_initialized", False) for layer in cache.layers):
                    ours = HfArchCache(config=self.config.get_text_config(decoder=True))
                    if generation_config.is_assistant and hasattr(ours, "activate_past_recording"):
                        # generate() armed the cache it made for rolling back an assistant's drafts; arm ours too.
                        ours.activate_past_recording(recurrent_states_to_keep=generation_config.num_assistant_tokens)
                    model_kwargs[name] = ours
        return result

    @staticmethod
    def create_masks_for_generate(attention_mask=None, **kwargs):
        """Keep generate's 2-D mask: the backbone builds each layer type's mask itself, and linear layers need the
        2-D padding mask (generate would otherwise turn it into a 4-D one whenever the cache is compileable)."""
        return attention_mask

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def plan_experts(self, input_ids=None, inputs_embeds=None) -> dict[int, torch.LongTensor]:
        """Read-ME: every sparse layer's experts for each token, known before the layers run (see
        ``HfArchModel.plan_experts``)."""
        return self.model.plan_experts(input_ids=input_ids, inputs_embeds=inputs_embeds)

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        output_router_logits: bool | None = None,
        return_dict: bool | None = None,
        cache: Cache | None = None,
        attention_transfer: bool = False,
        sparse_attention_mode: str | None = None,
        **kwargs,
    ) -> HfArchCausalLMOutputWithPast | HfArchMoeCausalLMOutputWithPast:
        """The cache comes as ``cache`` (transformers >= 5.25) or ``past_key_values``. ``attention_transfer`` /
        ``sparse_attention_mode``: see ``HfArchModel.forward``; the output carries the mixers' reports
        (``HfArchModelOutputWithPast``), and ``loss`` (with labels) includes ``sparse_attention_loss``,
        ``compute_loss`` and, for MoE,
        ``aux_loss``."""
        past_key_values = resolve_cache(cache, past_key_values, public=True)
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
            attention_transfer=attention_transfer,
            sparse_attention_mode=sparse_attention_mode,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        past = getattr(outputs, CACHE_OUTPUT_FIELD)
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, keep, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
            if self.training and past_key_values is None and consistency_regularised(self.config):
                # THOR: a second pass routes every token to other random experts; both passes' losses plus their
                # disagreement train the experts to be interchangeable.
                second = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                    inputs_embeds=inputs_embeds, use_cache=False, return_dict=True, **kwargs)
                second_logits = self.lm_head(second.last_hidden_state[:, keep, :])
                second_loss = self.loss_function(logits=second_logits, labels=labels,
                                                 vocab_size=self.config.vocab_size, **kwargs)
                loss = 0.5 * (loss + second_loss) + self.config.moe_consistency_coef * consistency_loss(
                    logits, second_logits, labels)
            loss = self._add_mixer_losses(loss, outputs)
        router_logits = getattr(outputs, "router_logits", None)
        if router_logits is not None:
            want_router_logits = (
                self.config.output_router_logits if output_router_logits is None else output_router_logits
            )
            aux_loss = None
            if labels is not None or want_router_logits:
                aux_loss, _ = moe_auxiliary_losses(router_logits, self.config, attention_mask)
                if loss is not None:
                    loss = loss + aux_loss.to(loss.device)
            output = HfArchMoeCausalLMOutputWithPast(
                loss=loss,
                aux_loss=aux_loss,
                logits=logits,
                **cache_output(past),
                hidden_states=outputs.hidden_states,
                attentions=outputs.attentions,
                router_logits=router_logits if want_router_logits else None,
                **auxiliary_outputs(outputs),
            )
            return output if self._wants_dict(return_dict) else output.to_tuple()
        output = HfArchCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            **cache_output(past),
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            **auxiliary_outputs(outputs),
        )
        return output if self._wants_dict(return_dict) else output.to_tuple()


class HfArchForSequenceClassification(GenericForSequenceClassification, HfArchPreTrainedModel):
    """Last-token classification head over the backbone (built through AutoModel, so registration must come first)."""

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                labels=None, use_cache=None, past_key_values=None, **kwargs):
        """transformers' generic head, taking the cache under either name; a loss also carries the sparse-attention
        terms of the same forward (the backbone output's ``sparse_attention_loss`` and ``compute_loss``, see
        ``_add_mixer_losses``)."""
        backbone_outputs = []  # the backbone's return value, kept from this call only
        hook = self.model.register_forward_hook(lambda module, args, output: backbone_outputs.append(output))
        try:
            output = super().forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                     inputs_embeds=inputs_embeds, labels=labels, use_cache=use_cache,
                                     **cache_output(resolve_cache(cache, past_key_values, public=True)), **kwargs)
        finally:
            hook.remove()
        if labels is None:
            return output
        if isinstance(output, tuple):
            return (self._add_mixer_losses(output[0], backbone_outputs[-1]), *output[1:])
        output.loss = self._add_mixer_losses(output.loss, backbone_outputs[-1])
        return output
