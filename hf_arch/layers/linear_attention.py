"""Gated linear-attention token mixer: GLA or Gated DeltaNet, optionally hybrid with a sliding window inside the layer.

    x ─ q/k/v_proj ─ [short conv + SiLU] ─ [q/k RMSNorm] ─ [RoPE] ─ gated linear recurrence ─┐
                                                 └─ (hybrid) RoPE ─ sliding-window softmax ──┴─ mix ─ output norm ─ o_proj

q/k/v/o_proj have the softmax attention layer's shapes (GQA key/value heads are repeated to the query heads), so a
Llama-family attention layer's weights load into this one unchanged. The recurrent state lives in transformers'
``LinearAttentionLayer`` cache (conv inputs in its conv state, the fp32 matrix state in its recurrent state); the
window branch's keys live in the sliding-window half of a ``hybrid_sliding`` layer. Padding never enters a state:
padded tokens get k = v = 0, no decay and β = 0, and zero conv inputs.

Linearization options (Liger / LoLCATs): a parameter-free key-pooled forget gate (``linear_attn_gate="key_pooled"``)
or none at all; a feature map on the linear branch's q/k (``softmax`` over the head dim, or LoLCATs' learnable
Hedgehog map ``[softmax(x W) ⊕ softmax(-x W)]`` of width 2D); a normalised linear branch
``φ(q)S / (φ(q)·z)`` computed with the same kernels by appending a ones column to v. LoLCATs' hybrid
(``linear_attn_hybrid="lolcats"``) instead shares that denominator with the window's softmax mass, its linear
inputs delayed by the window (``window_delay``) so only the keys the window has left enter the state. The forward argument
``attention_transfer=True`` (stage 1 of LoLCATs-style recovery) makes the layer return the exact softmax attention of
its own q/k/v/o weights, with the MSE between its linear output and that teacher as its auxiliary ``transfer_loss``
(``layers.auxiliary``; the model output gathers them in ``transfer_losses``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..configuration import LINEAR_LAYER_TYPES
from ..kernels.ops import gated_delta_rule, gla, sliding_window_attention, sliding_window_attention_with_mass
from ..kernels.lasp2 import active_plan
from ..kernels.still import select_salient
from ..kernels.sliding_window import sliding_window_attention_over_cache
from .attention import repeat_kv
from .attention_transfer import softmax_teacher, transfer_loss
from .auxiliary import mixer_result
from .mixer_registry import register_token_mixer
from .norm import HfArchGatedRMSNorm, build_qk_norms
from .rope import apply_rotary_pos_emb
from .short_conv import ShortConvolution
from .recurrent_inputs import recurrent_inputs
from .saliency_cache import saliency_layer
from .token_count_cache import TokenCountLayerMixin
from .window_delay import delay_by_window

__all__ = ["GLAAttention", "GatedDeltaNetAttention", "HfArchLinearAttention", "LINEAR_MIXER_KINDS", "cached_token_count"]

# Smallest denominator of the normalised linear branch (φ(q)·z), which is positive for the positive feature maps.
LINEAR_NORMALIZE_EPS = 1e-6


def cached_token_count(past_key_values) -> int:
    """Tokens already in the cache; works for all-linear models too (transformers counts attention layers only)."""
    if past_key_values is None:
        return 0
    for layer in getattr(past_key_values, "layers", []):
        # The first attention (KV) layer counts: the cache's own get_seq_length() reads layer 0, which may be linear
        # (transformers >= 5.25 then answers with a counter our layers do not drive).
        if hasattr(layer, "get_seq_length") and hasattr(layer, "keys"):
            return int(layer.get_seq_length())
    for layer in getattr(past_key_values, "layers", []):
        if isinstance(layer, TokenCountLayerMixin):  # linear mixers count in their cache entry (token_count_cache)
            return layer.seen_tokens
    return 0


def _linear_hedgehog(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Hedgehog feature map: x ``[B, T, H, D]``, weight ``[H, D, D]`` → ``[softmax(x W) ⊕ softmax(-x W)]`` ``[B, T, H, 2D]``."""
    proj = torch.einsum("bthd,hde->bthe", x, weight.to(x.dtype))
    proj = proj.to(torch.promote_types(proj.dtype, torch.float32))  # softmax in at least fp32
    return torch.cat([proj.softmax(-1), (-proj).softmax(-1)], dim=-1).to(x.dtype)


def norm_preserved_map(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """STILL's NP-Map: Hedgehog's direction, the input's own norm, ``‖x‖ · h(x) / ‖h(x)‖`` (``[B, T, H, D]`` →
    ``[B, T, H, 2D]``, non-negative): the learnable map changes where features point, never how long they are."""
    features = _linear_hedgehog(x, weight)
    wide = torch.promote_types(x.dtype, torch.float32)
    norm = x.to(wide).norm(dim=-1, keepdim=True)
    direction = features.to(wide) / features.to(wide).norm(dim=-1, keepdim=True).clamp(min=eps)
    return (norm * direction).to(x.dtype)


def norm_aware_query(q: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """NaLaFormer's query map ``[relu(q̂)^p ⊕ relu(-q̂)^p]`` with ``q̂ = q/‖q‖`` and ``p = 3(½ + tanh‖q‖)`` per query
    (``[B, T, H, D]`` → ``[B, T, H, 2D]``, computed in fp32): the norm softmax would use as a temperature sets how
    peaked the query's features are, which a plain positive map loses in the normalisation."""
    x = q.to(torch.promote_types(q.dtype, torch.float32))
    norm = x.norm(dim=-1, keepdim=True)
    direction = x / norm.clamp(min=eps)
    power = 3.0 * (0.5 + torch.tanh(norm))
    return torch.cat([direction.clamp(min=0) ** power, (-direction).clamp(min=0) ** power], dim=-1).to(q.dtype)


def norm_aware_key(k: torch.Tensor) -> torch.Tensor:
    """NaLaFormer's key map ``[relu(k³) ⊕ relu(-k³)]`` (``[B, T, H, D]`` → ``[B, T, H, 2D]``): non-negative, and a
    dimension only meets the query's feature of the same sign, so opposite directions add nothing (instead of the
    negative term a ReLU map would silently drop on one side only)."""
    cubed = k.to(torch.promote_types(k.dtype, torch.float32)) ** 3
    return torch.cat([cubed.clamp(min=0), (-cubed).clamp(min=0)], dim=-1).to(k.dtype)


class HfArchLinearAttention(nn.Module):
    """What GLA and Gated DeltaNet layers share (projections, conv, feature maps, normalisation, the window branch,
    cache and padding handling); each kind is a subclass below that builds its gates and runs its recurrence.
    ``HfArchLinearAttention(config, layer_idx)`` builds the subclass ``config.linear_attn_type`` names."""

    # Read by peft_utils (names relative to this module). q/k/v/o keep the attention layer's names and come
    # from the source checkpoint; the small gate projections (H outputs) are no LoRA targets. The short conv declares
    # itself new (ShortConvolution).
    lora_targets = ("q_proj", "k_proj", "v_proj", "o_proj", "output_gate_proj")
    new_parameters = ("forget_proj", "decay_proj", "beta_proj", "A_log", "dt_bias", "out_norm", "output_gate_proj",
                      "window_weight", "window_factor", "sink_logits", "q_feature_map", "k_feature_map")
    # Their options are the flat linear_attn_* fields (config.linear_attn_type must equal the registered name a layer
    # asks for). A hybrid's window branch sits in a hybrid_sliding layer.
    layer_types = LINEAR_LAYER_TYPES
    kind: str | None = None  # "gla" / "gated_deltanet", set by the subclasses
    supports_sequence_parallel = True  # LASP-2 (window-branch hybrids are refused at the forward)

    def __new__(cls, config=None, *args, **kwargs):
        if cls is HfArchLinearAttention and config is not None:
            cls = LINEAR_MIXER_KINDS[config.linear_attn_type]
        return super().__new__(cls)
    attention_backends = ()  # calls no attention backend

    def __init__(self, config, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.hybrid = config.linear_attn_hybrid
        self.head_dim = config.head_dim
        self.num_heads = config.num_attention_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.num_key_value_groups = self.num_heads // self.num_key_value_heads
        self.scaling = config.softmax_scale(self.head_dim)
        self.window = config.sliding_window if self.hybrid != "none" else None
        # The linear terms of LoLCATs' shared denominator are φ(q)·φ(k), unscaled; a normalised branch cancels it.
        self.linear_scale = 1.0 if self.hybrid in ("lolcats", "still") else self.head_dim**-0.5

        hidden, bias, H, D = config.hidden_size, config.attention_bias, self.num_heads, self.head_dim
        self.q_proj = nn.Linear(hidden, H * D, bias=bias)
        self.k_proj = nn.Linear(hidden, self.num_key_value_heads * D, bias=bias)
        self.v_proj = nn.Linear(hidden, self.num_key_value_heads * D, bias=bias)
        self.o_proj = nn.Linear(H * D, hidden, bias=config.attention_output_bias)
        self.q_norm, self.k_norm = build_qk_norms(config, H, self.num_key_value_heads, D)
        conv_channels = (H + 2 * self.num_key_value_heads) * D
        self.conv = ShortConvolution(conv_channels, config.linear_attn_conv_size) if config.linear_attn_conv_size else None

        self.gate = config.linear_attn_gate
        self.feature_map = config.linear_attn_feature_map
        self.normalize = config.linear_attn_normalize
        self.feature_dim = 2 * D if self.feature_map in ("hedgehog", "norm_aware", "np_map") else D
        self.forget_proj, self.decay_proj, self.beta_proj = None, None, None
        self._build_gates(config)
        if self.feature_map in ("hedgehog", "np_map"):  # one learnable D×D map per head, separate for q and k
            self.q_feature_map = nn.Parameter(torch.empty(H, D, D))
            self.k_feature_map = nn.Parameter(torch.empty(self.num_key_value_heads, D, D))
        else:
            self.q_feature_map, self.k_feature_map = None, None

        norm = config.linear_attn_output_norm
        self.out_norm = HfArchGatedRMSNorm(D, eps=config.rms_norm_eps) if norm != "none" else None
        self.output_gate_proj = nn.Linear(hidden, H * D, bias=False) if norm == "gated_rmsnorm" else None

        self.window_weight, self.window_factor, self.sink_logits = None, None, None
        if self.hybrid == "lizard":
            self.window_weight = nn.Parameter(torch.empty(()))  # α, learnable
            self.sink_logits = nn.Parameter(torch.empty(H, config.linear_attn_num_sinks)) if config.linear_attn_num_sinks else None
        elif self.hybrid in ("lolcats", "still"):
            self.window_factor = nn.Parameter(torch.empty(H))  # γ = sigmoid(window_factor) per head, learnable
        # STILL: blocks of positions and the tokens each keeps as softmax keys once the window has passed them
        self.selection = ((config.linear_attn_selection_block, config.linear_attn_selection_topk)
                          if self.hybrid == "still" else None)

    @torch.no_grad()
    def init_parameters(self, init) -> None:
        """This module's own parameters (transformers.initialization functions, so loaded weights are never
        overwritten). The conv initialises itself: transformers only visits modules holding parameters directly."""
        if self.decay_proj is not None:
            # Decay rates A in [1, 16] and time steps in [1e-3, 0.1] (log-uniform), as in Mamba-2 / Gated DeltaNet.
            init.copy_(self.A_log, torch.empty_like(self.A_log).uniform_(1, 16).log())
            dt = torch.exp(torch.empty_like(self.dt_bias).uniform_(math.log(1e-3), math.log(0.1))).clamp(min=1e-4)
            init.copy_(self.dt_bias, dt + torch.log(-torch.expm1(-dt)))  # softplus⁻¹(dt)
        if self.window_weight is not None:
            init.constant_(self.window_weight, self.config.linear_attn_mix_weights[1])
        if self.window_factor is not None:
            init.constant_(self.window_factor, math.log(self.config.linear_attn_mix_weights[1])
                           - math.log1p(-self.config.linear_attn_mix_weights[1]))  # sigmoid⁻¹(γ₀)
        if self.sink_logits is not None:
            init.zeros_(self.sink_logits)
        for fmap in (self.q_feature_map, self.k_feature_map):
            if fmap is not None:  # identity: φ(x) = [softmax(x), softmax(-x)] at init
                init.copy_(fmap, torch.eye(self.head_dim, dtype=fmap.dtype, device=fmap.device).expand_as(fmap))

    # -- pieces -------------------------------------------------------------------------------------------------

    def _build_gates(self, config) -> None:
        """The kind's gate parameters (none for the parameter-free key-pooled gate or no gate)."""
        raise NotImplementedError

    def _gates(self, x: torch.Tensor, k_raw: torch.Tensor):
        """Log decay (GLA ``[B, T, H, feature_dim]``, GDN ``[B, T, H]``) and β (GDN; GLA: None) in fp32.

        k_raw ``[B, T, H_kv, D]``: the k_proj output per key/value head (the key-pooled gate's input)."""
        B, T, _ = x.shape
        beta = self._write_strength(x)
        if self.gate == "none":  # plain linear attention (LoLCATs): no decay
            return x.new_zeros(self._decay_shape(B, T), dtype=torch.float32), beta
        if self.gate == "key_pooled":  # Liger: the forget gate is pooled from the key itself, no parameters
            k_heads = repeat_kv(k_raw.float().transpose(1, 2), self.num_key_value_groups).transpose(1, 2)
            return self._key_pooled_decay(k_heads), beta
        return self._learned_decay(x), beta

    def _write_strength(self, x: torch.Tensor) -> torch.Tensor | None:
        return None

    def _decay_shape(self, B: int, T: int) -> tuple[int, ...]:
        raise NotImplementedError

    def _key_pooled_decay(self, k_heads: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _learned_decay(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _feature_maps(self, q: torch.Tensor, k: torch.Tensor):
        """The linear branch's φ on q ``[B, T, H, D]`` and k ``[B, T, H_kv, D]`` (k before repeating to H heads)."""
        if self.feature_map == "softmax":  # Liger: softmax over the head dim
            return (q.softmax(-1, dtype=torch.promote_types(q.dtype, torch.float32)).to(q.dtype),
                    k.softmax(-1, dtype=torch.promote_types(k.dtype, torch.float32)).to(k.dtype))
        if self.feature_map == "hedgehog":
            return _linear_hedgehog(q, self.q_feature_map), _linear_hedgehog(k, self.k_feature_map)
        if self.feature_map == "norm_aware":
            return norm_aware_query(q), norm_aware_key(k)
        if self.feature_map == "np_map":
            return norm_preserved_map(q, self.q_feature_map), norm_preserved_map(k, self.k_feature_map)
        return q, k

    def _linear_branch(self, q, k, v, g, beta, initial_state, use_cache, cu_seqlens):
        raise NotImplementedError

    def _window_branch(self, q, k, v, cache, key_mask, cu_seqlens, return_mass: bool = False):
        """q ``[B, T, H, D]``, k/v ``[B, T, H_kv, D]`` (rotated). Uses and extends the layer's window KV cache.
        ``return_mass``: also each row's ``Σ exp(score - row max)`` ``[B, T, H]`` (LoLCATs' shared denominator)."""
        T = q.shape[1]
        if cache is not None:
            had_past = cache.layers[self.layer_idx].get_seq_length() > 0
            k_all, v_all = cache.update(k.transpose(1, 2), v.transpose(1, 2), self.layer_idx)
            if had_past:
                k_all, v_all = k_all.transpose(1, 2), v_all.transpose(1, 2)
                mask = key_mask[:, -k_all.shape[1]:] if key_mask is not None else None
                return sliding_window_attention_over_cache(q, k_all, v_all, self.window, self.sink_logits,
                                                           self.scaling, key_mask=mask, return_mass=return_mass)
        mask = key_mask[:, -T:] if key_mask is not None else None
        if return_mass:
            return sliding_window_attention_with_mass(q, k, v, self.window, scale=self.scaling,
                                                      cu_seqlens=cu_seqlens, attention_mask=mask)
        return sliding_window_attention(q, k, v, self.window, sink_logits=self.sink_logits, scale=self.scaling,
                                            cu_seqlens=cu_seqlens, attention_mask=mask)

    def _salient_softmax_branch(self, q, k, v, cache, key_mask, layer):
        """STILL's softmax keys for the new queries ``q [B, T, H, D]`` (keys / values ``[B, T, H_kv, D]``, rotated):
        the window plus the selected older tokens. Stores the new tokens' self-saliency in the cache entry and
        returns ``(output [B, T, H, D], mass [B, T, H], selected [B, past + T, H_kv])``, ``mass`` the softmax weights'
        sum relative to the row's maximum (LoLCATs' shared denominator takes it)."""
        B, T, H, D = q.shape
        H_kv, groups, window, scale = k.shape[2], self.num_key_value_groups, self.window, self.scaling
        past = layer.seen_tokens if layer is not None else 0
        if cache is not None:
            k_all, v_all = cache.update(k.transpose(1, 2), v.transpose(1, 2), self.layer_idx)
            k_all, v_all = k_all[:, :, : past + T].transpose(1, 2), v_all[:, :, : past + T].transpose(1, 2)
        else:
            k_all, v_all = k, v
        L = past + T
        real = key_mask[:, -L:].to(torch.bool) if key_mask is not None else torch.ones(B, L, dtype=torch.bool,
                                                                                          device=q.device)
        wide = torch.promote_types(q.dtype, torch.float32)
        qw, kw, vw = q.to(wide), repeat_kv(k_all.to(wide).transpose(1, 2), groups), repeat_kv(
            v_all.to(wide).transpose(1, 2), groups)  # keys / values [B, H, L, D]
        masked = -1e30  # finite: a row with no key (a padded query) stays finite

        # The window, query block by query block (each block's keys: its window back to its first query's).
        peaks, masses, outputs, saliency = [], [], [], []
        for start in range(0, T, window):
            stop = min(start + window, T)
            q_pos = past + torch.arange(start, stop, device=q.device)
            lo = max(0, past + start - window + 1)
            k_pos = torch.arange(lo, past + stop, device=q.device)
            scores = torch.einsum("bqhd,bhkd->bhqk", qw[:, start:stop], kw[:, :, lo: past + stop]) * scale
            visible = (k_pos[None, :] <= q_pos[:, None]) & (k_pos[None, :] > q_pos[:, None] - window)
            visible = visible[None, None] & real[:, None, None, lo: past + stop]
            scores = scores.masked_fill(~visible, masked)
            peak = scores.amax(-1)
            weights = torch.exp(scores - peak[..., None]) * visible
            peaks.append(peak)
            masses.append(weights.sum(-1))
            outputs.append(weights @ vw[:, :, lo: past + stop])
            own = scores.gather(-1, (q_pos - lo).view(1, 1, -1, 1).expand(B, H, -1, 1))[..., 0]
            saliency.append(own - (peak + masses[-1].clamp(min=1e-30).log()))  # log p(self | own window)
        peak, mass, out = torch.cat(peaks, 2), torch.cat(masses, 2), torch.cat(outputs, 2)  # [B, H, T(, D)]
        new_saliency = torch.cat(saliency, 2).view(B, H_kv, groups, T).mean(2).transpose(1, 2)  # [B, T, H_kv]
        new_saliency = new_saliency.masked_fill(~real[:, past:, None], float("-inf"))
        if layer is not None:
            if layer.saliency is not None:
                new_saliency = torch.cat([layer.saliency, new_saliency], dim=1)
            layer.saliency = new_saliency
        all_saliency = new_saliency
        row_start = (real.long().cumsum(-1) == 0).sum(-1)  # left padding before each row's first token
        block, topk = self.selection
        selected = select_salient(all_saliency, block, topk, row_start)  # [B, L, H_kv]

        # The selected tokens the window has left: the same for every query of a key head, gathered once.
        count = int(selected.sum(1).max()) if topk else 0
        if count:
            order = torch.argsort((~selected).to(torch.int8), dim=1, stable=True)[:, :count]  # [B, count, H_kv]
            chosen = selected.gather(1, order)
            positions = order.transpose(1, 2)  # [B, H_kv, count]
            index = positions[..., None].expand(-1, -1, -1, D)
            k_sel = repeat_kv(k_all.to(wide).transpose(1, 2).gather(2, index), groups)
            v_sel = repeat_kv(v_all.to(wide).transpose(1, 2).gather(2, index), groups)
            sel_pos = repeat_kv(positions[..., None], groups)[..., 0]  # [B, H, count]
            ok = repeat_kv(chosen.transpose(1, 2)[..., None], groups)[..., 0]
            q_pos = past + torch.arange(T, device=q.device)
            old = sel_pos[:, :, None, :] <= q_pos[None, None, :, None] - window  # [B, H, T, count]
            visible = old & ok[:, :, None, :]
            scores = (torch.einsum("bqhd,bhkd->bhqk", qw, k_sel) * scale).masked_fill(~visible, masked)
            top = torch.maximum(peak, scores.amax(-1))
            weights = torch.exp(scores - top[..., None]) * visible
            rescale = torch.exp(peak - top)
            mass = mass * rescale + weights.sum(-1)
            out = out * rescale[..., None] + weights @ v_sel
        out = out / mass.clamp(min=1e-30)[..., None]
        return out.transpose(1, 2).to(q.dtype), mass.transpose(1, 2), selected

    def _lolcats_mix(self, linear: torch.Tensor, window: torch.Tensor, mass: torch.Tensor) -> torch.Tensor:
        """LoLCATs' one denominator: ``(w·φ(q)S + γ·m·window) / (w·φ(q)z + γ·m)`` per head, with ``linear`` the
        unnormalised ``[φ(q)S, φ(q)z]`` over keys older than the window, ``m`` the window's softmax mass
        ``Σ exp(q·k/√d - max)`` and γ = sigmoid(window_factor); exact softmax while the window holds every key."""
        D = self.head_dim
        wide = torch.promote_types(linear.dtype, torch.float32)
        w_linear = self.config.linear_attn_mix_weights[0]
        window_mass = torch.sigmoid(self.window_factor.to(wide))[:, None] * mass.to(wide)[..., None]  # [B, T, H, 1]
        numerator = w_linear * linear[..., :D].to(wide) + window_mass * window.to(wide)
        denominator = w_linear * linear[..., D:].to(wide) + window_mass
        return (numerator / denominator.clamp(min=LINEAR_NORMALIZE_EPS)).to(window.dtype)

    # -- forward ------------------------------------------------------------------------------------------------

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        past_key_values=None,
        cu_seqlens: torch.LongTensor | None = None,
        position_in_sequence: torch.Tensor | None = None,
        attention_transfer: bool = False,
        **kwargs,
    ) -> tuple:
        """attention_mask: the 2-D ``[B, past + T]`` padding mask (1 = token) or None. Returns ``(output, None)``.

        With ``attention_transfer``, returns ``(softmax teacher's output, None, {"transfer_loss": MSE(linear output,
        teacher.detach())})``, the MSE over real tokens (no cache allowed)."""
        x = hidden_states
        B, T, _ = x.shape
        H, H_kv, D = self.num_heads, self.num_key_value_heads, self.head_dim
        inputs = recurrent_inputs(self, T, attention_mask, past_key_values, attention_transfer,
                                  **({"cache_entry": saliency_layer} if self.selection else {}))
        key_mask, token, layer = inputs.key_mask, inputs.token, inputs.cache_layer
        if self.selection and cu_seqlens is not None:
            raise NotImplementedError(f"layer {self.layer_idx}: STILL layers do not take packed sequences yet; pad the "
                                      "rows instead")
        if self.hybrid != "none" and active_plan() is not None:
            raise NotImplementedError(f"layer {self.layer_idx}: sequence parallelism does not cover the {self.hybrid} "
                                      "hybrid's window branch yet; use layer-level hybrids (softmax layers)")
        k_raw = self.k_proj(x)
        qkv = torch.cat([self.q_proj(x), k_raw, self.v_proj(x)], dim=-1)
        if token is not None:
            qkv = qkv * token.unsqueeze(-1).to(qkv.dtype)  # padding contributes nothing to the conv state
        if self.conv is not None:
            past_inputs = None
            if layer is not None:
                had_past = layer.has_previous_state[0]
                # Returns [cached inputs | new inputs] on continuation (the cached copy is updated in place).
                full = layer.update_conv_state(qkv.transpose(1, 2), 0, conv_kernel_size=self.conv.kernel_size)
                past_inputs = full[..., : full.shape[-1] - T] if had_past else None
            qkv = self.conv(qkv, past_inputs, position_in_sequence if cu_seqlens is not None else None)
        q, k, v = qkv.split([H * D, H_kv * D, H_kv * D], dim=-1)
        q, k, v = q.view(B, T, H, D), k.view(B, T, H_kv, D), v.view(B, T, H_kv, D)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)

        rotated = None
        if self.config.linear_attn_use_rope or self.hybrid != "none":
            qr, kr = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), *position_embeddings)
            rotated = qr.transpose(1, 2), kr.transpose(1, 2)
        lq, lk = rotated if self.config.linear_attn_use_rope else (q, k)

        g, beta = self._gates(x, k_raw.view(B, T, H_kv, D))
        lq, lk = self._feature_maps(lq, lk)
        lk_h = repeat_kv(lk.transpose(1, 2), self.num_key_value_groups).transpose(1, 2)
        lv_h = repeat_kv(v.transpose(1, 2), self.num_key_value_groups).transpose(1, 2)
        if self.normalize:  # v' = [v, 1]: the extra channel accumulates z_t = Σ decay · φ(k)
            lv_h = torch.cat([lv_h, lv_h.new_ones(B, T, H, 1)], dim=-1)
        if token is not None:  # padded tokens: no write, no decay
            keep = token[..., None, None]
            lk_h, lv_h = lk_h * keep.to(lk_h.dtype), lv_h * keep.to(lv_h.dtype)
            g = g * keep.to(g.dtype) if g.dim() == 4 else g * token[..., None].to(g.dtype)
            beta = beta * token[..., None].to(beta.dtype) if beta is not None else None

        if self.selection:  # STILL's softmax keys first: the selection decides what may enter the linear state
            window, mass, selected = self._salient_softmax_branch(rotated[0], rotated[1], v, past_key_values, key_mask,
                                                                  layer)
        if self.hybrid in ("lolcats", "still"):  # the linear terms cover only keys older than the window
            in_sequence = position_in_sequence if cu_seqlens is not None else None
            lk_h, lv_h, g, beta = delay_by_window([lk_h, lv_h, g, beta], self.window, layer, in_sequence)
        if self.selection:  # the token entering the state now arrived `window` positions ago: selected, it stays out
            arrived = torch.arange(selected.shape[1] - T, selected.shape[1], device=x.device) - self.window
            entering = selected[:, arrived.clamp(min=0)] & (arrived >= 0)[None, :, None]  # [B, T, H_kv]
            stays_out = repeat_kv(entering.transpose(1, 2)[..., None], self.num_key_value_groups)[..., 0]
            lk_h = lk_h * (~stays_out).transpose(1, 2)[..., None].to(lk_h.dtype)

        initial_state = None
        if layer is not None and layer.is_recurrent_states_initialized[0]:
            initial_state = layer.recurrent_states[0]
        o, final_state = self._linear_branch(lq, lk_h, lv_h, g, beta, initial_state, layer is not None, cu_seqlens)
        if self.normalize and self.hybrid not in ("lolcats", "still"):  # o = φ(q)S / (φ(q)·z); the scale cancels
            wide = torch.promote_types(o.dtype, torch.float32)
            o = (o[..., :D].to(wide) / o[..., D:].to(wide).clamp(min=LINEAR_NORMALIZE_EPS)).to(o.dtype)
        if layer is not None:
            layer.update_recurrent_state(final_state, 0)
            layer.add_tokens(T)

        if self.hybrid == "lolcats":
            window, mass = self._window_branch(rotated[0], rotated[1], v, past_key_values, key_mask, cu_seqlens,
                                               return_mass=True)
            o = self._lolcats_mix(o, window, mass)
        elif self.selection:
            o = self._lolcats_mix(o, window, mass)
        elif self.hybrid != "none":
            window = self._window_branch(rotated[0], rotated[1], v, past_key_values, key_mask, cu_seqlens)
            w_lin, w_win = self.config.linear_attn_mix_weights
            if self.hybrid == "lizard":
                o = o + self.window_weight.to(o.dtype) * window
            else:
                o = w_lin * o + w_win * window

        if self.out_norm is not None:
            gate = self.output_gate_proj(x).view(B, T, H, D) if self.output_gate_proj is not None else None
            o = self.out_norm(o, gate)
        out = self.o_proj(o.reshape(B, T, H * D))
        if not attention_transfer:
            return out, None
        teacher = softmax_teacher(self, x, position_embeddings, key_mask, cu_seqlens)
        return mixer_result(teacher, None, {"transfer_loss": transfer_loss(out, teacher, token)})


@register_token_mixer("gla")
class GLAAttention(HfArchLinearAttention):
    """Gated Linear Attention: a per-key-channel forget gate (low-rank, scalar per head, key-pooled or none)."""

    kind = "gla"

    def _build_gates(self, config) -> None:
        H, D = self.num_heads, self.head_dim
        if config.linear_attn_gate == "low_rank":
            r = config.linear_attn_gate_low_rank_dim
            self.forget_proj = nn.Sequential(nn.Linear(config.hidden_size, r, bias=False),
                                             nn.Linear(r, H * D, bias=True))
        elif config.linear_attn_gate == "scalar":
            self.forget_proj = nn.Linear(config.hidden_size, H, bias=True)

    def _decay_shape(self, B: int, T: int) -> tuple[int, ...]:
        return B, T, self.num_heads, self.feature_dim

    def _widen(self, g: torch.Tensor) -> torch.Tensor:
        """``[B, T, H, D]`` gates to the feature width (Hedgehog's 2D features share their channel's gate)."""
        return torch.cat([g, g], dim=-1) if self.feature_dim != self.head_dim else g

    def _key_pooled_decay(self, k_heads: torch.Tensor) -> torch.Tensor:
        return self._widen(F.logsigmoid(k_heads) / self.config.linear_attn_gate_normalizer)

    def _learned_decay(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        g = F.logsigmoid(self.forget_proj(x).float()) / self.config.linear_attn_gate_normalizer
        if self.gate == "low_rank":
            return self._widen(g.view(B, T, self.num_heads, self.head_dim))
        return g.view(B, T, self.num_heads, 1).expand(B, T, self.num_heads, self.feature_dim)

    def _linear_branch(self, q, k, v, g, beta, initial_state, use_cache, cu_seqlens):
        return gla(q, k, v, g, scale=self.linear_scale, initial_state=initial_state, output_final_state=use_cache,
                   cu_seqlens=cu_seqlens)


@register_token_mixer("gated_deltanet")
class GatedDeltaNetAttention(HfArchLinearAttention):
    """Gated DeltaNet: the delta rule with a Mamba-2-style per-head decay (key-pooled or none: parameter-free) and a
    per-head write strength β."""

    kind = "gated_deltanet"

    def _build_gates(self, config) -> None:
        H = self.num_heads
        if config.linear_attn_gate not in ("key_pooled", "none"):
            self.decay_proj = nn.Linear(config.hidden_size, H, bias=False)
            self.A_log = nn.Parameter(torch.empty(H))
            self.dt_bias = nn.Parameter(torch.empty(H))
        self.beta_proj = nn.Linear(config.hidden_size, H, bias=False)

    def _write_strength(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.beta_proj(x).float())

    def _decay_shape(self, B: int, T: int) -> tuple[int, ...]:
        return B, T, self.num_heads

    def _key_pooled_decay(self, k_heads: torch.Tensor) -> torch.Tensor:
        return F.logsigmoid(k_heads.mean(-1)) / self.config.linear_attn_gate_normalizer

    def _learned_decay(self, x: torch.Tensor) -> torch.Tensor:
        return -self.A_log.float().exp() * F.softplus(self.decay_proj(x).float() + self.dt_bias.float())

    def _linear_branch(self, q, k, v, g, beta, initial_state, use_cache, cu_seqlens):
        return gated_delta_rule(q, k, v, g, beta, scale=self.linear_scale, initial_state=initial_state,
                                output_final_state=use_cache, cu_seqlens=cu_seqlens,
                                use_qk_l2norm=self.config.linear_attn_qk_norm == "l2")


# The kind config.linear_attn_type names -> its class (HfArchLinearAttention(config, i) builds it).
LINEAR_MIXER_KINDS = {cls.kind: cls for cls in (GLAAttention, GatedDeltaNetAttention)}
