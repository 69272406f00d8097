"""Multi-head Latent Attention (MLA; DeepSeek-V2, and the full-attention layers of Kimi Linear) as a token mixer.

Keys and values come from one low-rank latent per token, shared by all heads:

    c_t = RMSNorm(W_dkv x_t)               [kv_lora_rank]       (kv_a_proj_with_mqa, kv_a_layernorm)
    k_rot_t = W_kr x_t                     [qk_rope_head_dim]   (the other columns of kv_a_proj_with_mqa)
    [k_nope, v]_t,h = W_ukv c_t            per head             (kv_b_proj)
    k_t,h = [k_nope_t,h ; k_rot_t]         k_rot shared by every head (one "MQA" key part)

The cache holds ``c_t`` and ``k_rot_t`` (``kv_lora_rank + qk_rope_head_dim`` numbers per token and layer, instead of
``2·H·D``) and they are expanded to per-head keys and values after the cache update, so decoding reads the same keys
as the full forward. The layer's cache entry stores the latent as the "keys" ``[B, 1, S, kv_lora_rank]`` and k_rot as
the "values" ``[B, 1, S, qk_rope_head_dim]``: one head, standard 4-D shapes, so every transformers cache layer
(dynamic, static, offloaded) handles it.

``use_rope``: RoPE on the rope part of the queries and on the shared k_rot (DeepSeek-V2), with the backbone's
``(cos, sin)`` and the non-interleaved rotate_half layout of ``rope.py``. Kimi Linear's MLA is NoPE (positions come from
its linear-attention layers), the default here. Module names are transformers' (``q_proj`` or ``q_a_proj`` +
``q_a_layernorm`` + ``q_b_proj``, ``kv_a_proj_with_mqa``, ``kv_a_layernorm``, ``kv_b_proj``, ``o_proj``), so a
DeepSeek or Kimi MLA state dict loads key for key (a DeepSeek checkpoint's interleaved rope columns need the usual
de-interleaving permutation of q's and k_rot's rope rows first).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .attention import eager_attention_forward
from .mixer_registry import mixer_options, register_token_mixer
from .norm import HfArchRMSNorm
from .rope import apply_rotary_pos_emb

# Arguments the backbone hands every mixer that this layer has no use for (the masks carry packing and padding).
_UNUSED_MIXER_KWARGS = ("cu_seqlens", "position_in_sequence", "padding_mask", "value_bank", "attention_transfer",
                        "sparse_attention_mode")


def _is_positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


@dataclass
class MLAOptions:
    """Shapes of an MLA layer (``config.mixer_options["mla"]``).

    kv_lora_rank: width of the cached key/value latent.
    q_lora_rank: width of the query bottleneck (``q_a_proj`` → RMSNorm → ``q_b_proj``); None: one ``q_proj``.
    qk_nope_head_dim: per-head query/key width without position encoding (from the latent).
    qk_rope_head_dim: width of the key part shared by all heads (RoPE'd when ``use_rope``).
    v_head_dim: per-head value width.
    use_rope: RoPE on the rope parts (DeepSeek-V2); False: NoPE (Kimi Linear).
    latent_norm_eps: eps of the q/kv latent RMSNorms; None: ``config.rms_norm_eps``. DeepSeek-V2/V3 and Kimi Linear
        (reference code and transformers) use 1e-6 there whatever their ``rms_norm_eps``.
    """

    kv_lora_rank: int = 64
    q_lora_rank: int | None = None
    qk_nope_head_dim: int = 32
    qk_rope_head_dim: int = 16
    v_head_dim: int = 32
    use_rope: bool = False
    latent_norm_eps: float | None = None

    def __post_init__(self) -> None:
        for name in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
            value = getattr(self, name)
            if not _is_positive_int(value):
                raise ValueError(f"MLAOptions.{name} must be a positive integer, got {value!r}")
        if self.q_lora_rank is not None and not _is_positive_int(self.q_lora_rank):
            raise ValueError(f"MLAOptions.q_lora_rank must be None or a positive integer, got {self.q_lora_rank!r}")
        if not isinstance(self.use_rope, bool):
            raise ValueError(f"MLAOptions.use_rope must be a bool, got {self.use_rope!r}")
        if self.use_rope and self.qk_rope_head_dim % 2:
            # rotate_half pairs dimension i with i + D/2.
            raise ValueError("MLAOptions.qk_rope_head_dim must be even when use_rope=True, got "
                             f"{self.qk_rope_head_dim}")
        eps = self.latent_norm_eps
        if eps is not None and (isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < 1):
            raise ValueError(f"MLAOptions.latent_norm_eps must be None or a number in (0, 1), got {eps!r}")

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _yarn_mscale_squared(config) -> float:
    """DeepSeek folds YaRN's ``mscale_all_dim`` into the softmax scale (all of q·k, not just the rotary part, which
    the rotary table's attention factor already scales); 1 for any other rope type."""
    params = getattr(config, "rope_parameters", None) or {}
    if params.get("rope_type", "default") != "yarn":
        return 1.0
    mscale_all_dim, factor = params.get("mscale_all_dim") or 0, params.get("factor") or 1.0
    if not mscale_all_dim or factor <= 1:
        return 1.0
    mscale = 0.1 * mscale_all_dim * math.log(factor) + 1.0
    return mscale * mscale


@register_token_mixer("mla")
class MultiHeadLatentAttention(nn.Module):
    """MLA token mixer: ``forward(hidden [B, T, hidden], position_embeddings=(cos, sin) [B, T, head_dim], …)`` →
    (``[B, T, hidden]``, ``[B, H, T, S]`` weights from the eager backend or None)."""

    layer_types = ("full_attention",)  # its cache entry and mask: a softmax attention layer's
    # Flash kernels need equal q/k and v head dims (here qk_nope + qk_rope vs v_head_dim); eager and SDPA do not.
    attention_backends = ("eager", "sdpa")
    # Read by peft_utils; the names absent in a given layout (q_proj vs q_a_proj/q_b_proj) are skipped there.
    lora_targets = ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")
    # What a Llama-family checkpoint does not have (q_proj / o_proj share Llama's names; a conversion that kept them
    # would still need everything here).
    new_parameters = ("q_a_proj", "q_a_layernorm", "q_b_proj", "kv_a_proj_with_mqa", "kv_a_layernorm", "kv_b_proj")
    options_class = MLAOptions

    def __init__(self, config, layer_idx: int, options: MLAOptions | None = None) -> None:
        super().__init__()
        options = mixer_options(config, "mla", MLAOptions) if options is None else options
        if not isinstance(options, MLAOptions):
            raise TypeError(f"options must be an MLAOptions, got {type(options).__name__}")
        if options.use_rope and getattr(config, "head_dim", None) != options.qk_rope_head_dim:
            raise ValueError(
                f"MLA with use_rope=True needs config.head_dim == qk_rope_head_dim (the backbone builds its rotary "
                f"table for head_dim): got head_dim={getattr(config, 'head_dim', None)}, "
                f"qk_rope_head_dim={options.qk_rope_head_dim}")
        self.config = config
        self.options = options
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_key_value_groups = 1  # keys/values are expanded to every head before the backend
        self.is_causal = True
        self.attention_dropout = config.attention_dropout
        self.kv_lora_rank = options.kv_lora_rank
        self.qk_nope_head_dim = options.qk_nope_head_dim
        self.qk_rope_head_dim = options.qk_rope_head_dim
        self.qk_head_dim = options.qk_head_dim
        self.v_head_dim = options.v_head_dim
        self.use_rope = options.use_rope
        self.scaling = self.qk_head_dim**-0.5 * (_yarn_mscale_squared(config) if options.use_rope else 1.0)

        hidden, bias = config.hidden_size, config.attention_bias
        eps = config.rms_norm_eps if options.latent_norm_eps is None else options.latent_norm_eps
        # Bias placement as in DeepSeek-V2 / Kimi: the down projections and o_proj follow attention_bias, the up
        # projections (q_proj, q_b_proj, kv_b_proj) never have one; checkpoints then load key for key.
        q_width = self.num_heads * self.qk_head_dim
        if options.q_lora_rank is None:
            self.q_proj = nn.Linear(hidden, q_width, bias=False)
            self.q_a_proj = self.q_a_layernorm = self.q_b_proj = None
        else:
            self.q_proj = None
            self.q_a_proj = nn.Linear(hidden, options.q_lora_rank, bias=bias)
            self.q_a_layernorm = HfArchRMSNorm(options.q_lora_rank, eps=eps)
            self.q_b_proj = nn.Linear(options.q_lora_rank, q_width, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(hidden, self.kv_lora_rank + self.qk_rope_head_dim, bias=bias)
        self.kv_a_layernorm = HfArchRMSNorm(self.kv_lora_rank, eps=eps)
        self.kv_b_proj = nn.Linear(self.kv_lora_rank, self.num_heads * (self.qk_nope_head_dim + self.v_head_dim),
                                   bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.v_head_dim, hidden, bias=bias)

    def queries(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """``[B, T, hidden]`` → ``[B, H, T, qk_head_dim]`` (nope part first, rope part last; before RoPE)."""
        if self.q_proj is not None:
            query = self.q_proj(hidden_states)
        else:
            query = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(hidden_states)))
        return query.view(*hidden_states.shape[:-1], self.num_heads, self.qk_head_dim).transpose(1, 2)

    def latents(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B, T, hidden]`` → (normed latent ``[B, 1, T, kv_lora_rank]``, k_rot ``[B, 1, T, qk_rope_head_dim]``,
        before RoPE): what the cache stores, as one-head 4-D tensors."""
        latent, k_rot = self.kv_a_proj_with_mqa(hidden_states).split([self.kv_lora_rank, self.qk_rope_head_dim], -1)
        return self.kv_a_layernorm(latent).unsqueeze(1), k_rot.unsqueeze(1)

    def expand(self, latent: torch.Tensor, k_rot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Latents ``[B, 1, S, kv_lora_rank]``, ``[B, 1, S, qk_rope_head_dim]`` → keys ``[B, H, S, qk_head_dim]``,
        values ``[B, H, S, v_head_dim]``."""
        batch, _, length, _ = latent.shape
        key_value = self.kv_b_proj(latent.squeeze(1))
        key_value = key_value.view(batch, length, self.num_heads, self.qk_nope_head_dim + self.v_head_dim)
        k_nope, value = key_value.transpose(1, 2).split([self.qk_nope_head_dim, self.v_head_dim], -1)
        key = torch.cat((k_nope, k_rot.expand(-1, self.num_heads, -1, -1)), dim=-1)
        return key, value

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        past_key_values=None,
        output_attentions: bool = False,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``hidden_states [B, T, hidden]``; ``position_embeddings``: ``(cos, sin) [B, T, head_dim]`` (read only with
        ``use_rope``); ``attention_mask``: what the backbone builds for full_attention layers (4-D for eager, 4-D or
        None for SDPA). Returns (``[B, T, hidden]``, weights or None)."""
        for name in _UNUSED_MIXER_KWARGS:
            kwargs.pop(name, None)
        implementation = self.config._attn_implementation
        if implementation not in (None, *self.attention_backends):
            raise ValueError(f"layer {self.layer_idx}: MLA runs on attn_implementation in {self.attention_backends}, "
                             f"got {implementation!r} (its q/k head dim {self.qk_head_dim} and v head dim "
                             f"{self.v_head_dim} differ)")
        query = self.queries(hidden_states)
        latent, k_rot = self.latents(hidden_states)
        if self.use_rope:
            if position_embeddings is None:
                raise ValueError(f"layer {self.layer_idx}: MLA with use_rope=True needs position_embeddings=(cos, sin)")
            q_nope, q_rot = query.split([self.qk_nope_head_dim, self.qk_rope_head_dim], -1)
            q_rot, k_rot = apply_rotary_pos_emb(q_rot, k_rot, *position_embeddings)
            query = torch.cat((q_nope, q_rot), dim=-1)
        if past_key_values is not None:  # cache the compressed latents (k_rot after RoPE), expand what comes back
            latent, k_rot = past_key_values.update(latent, k_rot, self.layer_idx)
        key, value = self.expand(latent, k_rot)
        attention_fn = (
            eager_attention_forward
            if implementation in (None, "eager")
            else ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention_forward)
        )
        attn_output, attn_weights = attention_fn(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=self.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
            **kwargs,
        )
        attn_output = attn_output.reshape(*hidden_states.shape[:-1], -1).contiguous()
        return self.o_proj(attn_output), attn_weights
