"""Gated linear-attention token mixer: GLA or Gated DeltaNet, optionally hybrid with a sliding window inside the layer.

    x ─ q/k/v_proj ─ [short conv + SiLU] ─ [q/k RMSNorm] ─ [RoPE] ─ gated linear recurrence ─┐
                                                 └─ (hybrid) RoPE ─ sliding-window softmax ──┴─ mix ─ output norm ─ o_proj

q/k/v/o_proj have the softmax attention layer's shapes (GQA key/value heads are repeated to the query heads), so a
Llama-family attention layer's weights load into this one unchanged. The recurrent state lives in transformers'
``LinearAttentionLayer`` cache (conv inputs in its conv state, the fp32 matrix state in its recurrent state); the
window branch's keys live in the sliding-window half of a ``hybrid_sliding`` layer. Padding never enters a state:
padded tokens get k = v = 0, no decay and β = 0, and zero conv inputs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels.ops import gated_delta_rule, gla, sliding_window_attention
from ..kernels.sliding_window import sliding_window_attention_over_cache
from .attention import repeat_kv
from .norm import HfArchGatedRMSNorm, HfArchRMSNorm
from .rope import apply_rotary_pos_emb
from .short_conv import ShortConvolution

__all__ = ["HfArchLinearAttention", "cached_token_count"]

SEEN_TOKENS_ATTR = "hf_arch_seen_tokens"


def cached_token_count(past_key_values) -> int:
    """Tokens already in the cache; works for all-linear models too (transformers counts attention layers only)."""
    if past_key_values is None:
        return 0
    for layer in getattr(past_key_values, "layers", []):
        if hasattr(layer, "get_seq_length") and hasattr(layer, "keys"):  # an attention (KV) layer
            return past_key_values.get_seq_length()
    for layer in getattr(past_key_values, "layers", []):
        if hasattr(layer, SEEN_TOKENS_ATTR):
            return getattr(layer, SEEN_TOKENS_ATTR)
    return 0


class HfArchLinearAttention(nn.Module):
    def __init__(self, config, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.kind = config.linear_attn_type
        self.hybrid = config.linear_attn_hybrid
        self.head_dim = config.head_dim
        self.num_heads = config.num_attention_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.num_key_value_groups = self.num_heads // self.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.window = config.sliding_window if self.hybrid != "none" else None

        hidden, bias, H, D = config.hidden_size, config.attention_bias, self.num_heads, self.head_dim
        self.q_proj = nn.Linear(hidden, H * D, bias=bias)
        self.k_proj = nn.Linear(hidden, self.num_key_value_heads * D, bias=bias)
        self.v_proj = nn.Linear(hidden, self.num_key_value_heads * D, bias=bias)
        self.o_proj = nn.Linear(H * D, hidden, bias=config.attention_output_bias)
        self.q_norm = HfArchRMSNorm(D, eps=config.rms_norm_eps) if config.qk_norm else None
        self.k_norm = HfArchRMSNorm(D, eps=config.rms_norm_eps) if config.qk_norm else None
        conv_channels = (H + 2 * self.num_key_value_heads) * D
        self.conv = ShortConvolution(conv_channels, config.linear_attn_conv_size) if config.linear_attn_conv_size else None

        if self.kind == "gla":
            out = H * D if config.linear_attn_gate == "low_rank" else H
            if config.linear_attn_gate == "low_rank":
                r = config.linear_attn_gate_low_rank_dim
                self.forget_proj = nn.Sequential(nn.Linear(hidden, r, bias=False), nn.Linear(r, out, bias=True))
            else:
                self.forget_proj = nn.Linear(hidden, out, bias=True)
        else:  # gated_deltanet: Mamba-2-style decay and a per-head write strength
            self.decay_proj = nn.Linear(hidden, H, bias=False)
            self.A_log = nn.Parameter(torch.empty(H))
            self.dt_bias = nn.Parameter(torch.empty(H))
            self.beta_proj = nn.Linear(hidden, H, bias=False)

        norm = config.linear_attn_output_norm
        self.out_norm = HfArchGatedRMSNorm(D, eps=config.rms_norm_eps) if norm != "none" else None
        self.output_gate_proj = nn.Linear(hidden, H * D, bias=False) if norm == "gated_rmsnorm" else None

        if self.hybrid == "lizard":
            self.window_weight = nn.Parameter(torch.empty(()))  # α, learnable
            self.sink_logits = nn.Parameter(torch.empty(H, config.linear_attn_num_sinks)) if config.linear_attn_num_sinks else None
        else:
            self.window_weight, self.sink_logits = None, None

    @torch.no_grad()
    def init_parameters(self, init) -> None:
        """This module's own parameters (transformers.initialization functions, so loaded weights are never
        overwritten). The conv initialises itself: transformers only visits modules holding parameters directly."""
        if self.kind == "gated_deltanet":
            # Decay rates A in [1, 16] and time steps in [1e-3, 0.1] (log-uniform), as in Mamba-2 / Gated DeltaNet.
            init.copy_(self.A_log, torch.empty_like(self.A_log).uniform_(1, 16).log())
            dt = torch.exp(torch.empty_like(self.dt_bias).uniform_(math.log(1e-3), math.log(0.1))).clamp(min=1e-4)
            init.copy_(self.dt_bias, dt + torch.log(-torch.expm1(-dt)))  # softplus⁻¹(dt)
        if self.window_weight is not None:
            init.constant_(self.window_weight, self.config.linear_attn_mix_weights[1])
        if self.sink_logits is not None:
            init.zeros_(self.sink_logits)

    # -- pieces -------------------------------------------------------------------------------------------------

    def _gates(self, x: torch.Tensor):
        """Log decay (GLA ``[B, T, H, D]``, GDN ``[B, T, H]``) and β (GDN) in fp32."""
        B, T, _ = x.shape
        if self.kind == "gla":
            g = F.logsigmoid(self.forget_proj(x).float()) / self.config.linear_attn_gate_normalizer
            g = g.view(B, T, self.num_heads, -1).expand(B, T, self.num_heads, self.head_dim)
            return g, None
        g = -self.A_log.float().exp() * F.softplus(self.decay_proj(x).float() + self.dt_bias.float())
        return g, torch.sigmoid(self.beta_proj(x).float())

    def _linear_branch(self, q, k, v, g, beta, initial_state, use_cache, cu_seqlens):
        if self.kind == "gla":
            return gla(q, k, v, g, scale=self.scaling, initial_state=initial_state,
                           output_final_state=use_cache, cu_seqlens=cu_seqlens)
        return gated_delta_rule(q, k, v, g, beta, scale=self.scaling, initial_state=initial_state,
                                    output_final_state=use_cache, cu_seqlens=cu_seqlens,
                                    use_qk_l2norm=self.config.linear_attn_qk_norm == "l2")

    def _window_branch(self, q, k, v, cache, key_mask, cu_seqlens):
        """q ``[B, T, H, D]``, k/v ``[B, T, H_kv, D]`` (rotated). Uses and extends the layer's window KV cache."""
        T = q.shape[1]
        if cache is not None:
            had_past = cache.layers[self.layer_idx].get_seq_length() > 0
            k_all, v_all = cache.update(k.transpose(1, 2), v.transpose(1, 2), self.layer_idx)
            if had_past:
                k_all, v_all = k_all.transpose(1, 2), v_all.transpose(1, 2)
                mask = key_mask[:, -k_all.shape[1]:] if key_mask is not None else None
                return sliding_window_attention_over_cache(q, k_all, v_all, self.window, self.sink_logits,
                                                           self.scaling, key_mask=mask)
        mask = key_mask[:, -T:] if key_mask is not None else None
        return sliding_window_attention(q, k, v, self.window, sink_logits=self.sink_logits, scale=self.scaling,
                                            cu_seqlens=cu_seqlens, attention_mask=mask)

    # -- forward ------------------------------------------------------------------------------------------------

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        past_key_values=None,
        cu_seqlens: torch.LongTensor | None = None,
        position_in_sequence: torch.Tensor | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, None]:
        """attention_mask: the 2-D ``[B, past + T]`` padding mask (1 = token) or None."""
        x = hidden_states
        B, T, _ = x.shape
        H, H_kv, D = self.num_heads, self.num_key_value_heads, self.head_dim
        key_mask = attention_mask if attention_mask is not None and attention_mask.dim() == 2 else None
        token = key_mask[:, -T:].to(torch.bool) if key_mask is not None else None
        layer = past_key_values.layers[self.layer_idx] if past_key_values is not None else None

        qkv = torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], dim=-1)
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

        g, beta = self._gates(x)
        lk_h = repeat_kv(lk.transpose(1, 2), self.num_key_value_groups).transpose(1, 2)
        lv_h = repeat_kv(v.transpose(1, 2), self.num_key_value_groups).transpose(1, 2)
        if token is not None:  # padded tokens: no write, no decay
            keep = token[..., None, None]
            lk_h, lv_h = lk_h * keep.to(lk_h.dtype), lv_h * keep.to(lv_h.dtype)
            g = g * keep.to(g.dtype) if g.dim() == 4 else g * token[..., None].to(g.dtype)
            beta = beta * token[..., None].to(beta.dtype) if beta is not None else None

        initial_state = None
        if layer is not None and layer.is_recurrent_states_initialized[0]:
            initial_state = layer.recurrent_states[0]
        o, final_state = self._linear_branch(lq, lk_h, lv_h, g, beta, initial_state, layer is not None, cu_seqlens)
        if layer is not None:
            layer.update_recurrent_state(final_state, 0)
            setattr(layer, SEEN_TOKENS_ATTR, getattr(layer, SEEN_TOKENS_ATTR, 0) + T)

        if self.hybrid != "none":
            window = self._window_branch(rotated[0], rotated[1], v, past_key_values, key_mask, cu_seqlens)
            w_lin, w_win = self.config.linear_attn_mix_weights
            if self.hybrid == "lizard":
                o = o + self.window_weight.to(o.dtype) * window
            else:
                o = w_lin * o + w_win * window

        if self.out_norm is not None:
            gate = self.output_gate_proj(x).view(B, T, H, D) if self.output_gate_proj is not None else None
            o = self.out_norm(o, gate)
        return self.o_proj(o.reshape(B, T, H * D)), None
