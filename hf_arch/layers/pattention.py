"""TokenFormer's token-parameter attention (Wang et al., "TokenFormer: Rethinking Transformer Scaling with Tokenized
Model Parameters"): every linear projection becomes attention from the input tokens to learnable parameter tokens.

    Pattention(x) = Θ(x K_Pᵀ) V_P,     Θ(a) = GeLU(a) / ‖GeLU(a)‖₂ · √n₀

``K_P [n, d_in]`` and ``V_P [n, d_out]`` are ``n`` key / value parameter tokens. Θ is the paper's modified softmax in
the form its code runs (GeLU, then an L2 normalisation over the parameter tokens, times √n). We keep ``n₀`` — the
count at which a layer was created — fixed through growth (``scale_tokens``): a grown layer's new keys start at
zero, their scores at 0 and GeLU(0) = 0, so neither the weights nor their norm change whatever the new values are,
and with the scale fixed the function is exactly the one before growth (with √n the scale would jump by √(n/n₀)).

Two registered mixers (options in ``config.mixer_options["pattention"]``):

- token mixer ``pattention``: softmax attention among the input tokens whose q, k, v and output projections are
  Pattention layers;
- channel mixer ``pattention``: the feed-forward block as one Pattention layer (hidden → hidden).

Every parameter here is new (no standard checkpoint has parameter tokens). LoRA reaches the token matrices through
peft's ``target_parameters`` (``lora_target_parameters``); TokenFormer's own way to add capacity cheaply is growth
(``--to tokenformer --grow N``), after which the old tokens can be frozen and only the new ones trained.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .attention import HfArchAttention
from .mixer_registry import mixer_options, register_channel_mixer, register_token_mixer

__all__ = ["Pattention", "PattentionAttention", "PattentionFFN", "TokenFormerOptions"]


@dataclass(frozen=True)
class TokenFormerOptions:
    attention_param_tokens: int | None = None  # per q / k / v / o projection (None: hidden_size)
    ffn_param_tokens: int | None = None  # the feed-forward Pattention (None: intermediate_size)
    # n₀ of Θ's √n₀ scale; None: the token counts above. Growth records the counts it started from here.
    attention_scale_tokens: int | None = None
    ffn_scale_tokens: int | None = None

    def __post_init__(self) -> None:
        for name in ("attention_param_tokens", "ffn_param_tokens", "attention_scale_tokens", "ffn_scale_tokens"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"mixer_options['pattention'].{name} must be an integer >= 1 or None, got {value!r}")

    def counts(self, config) -> dict:
        """``{attention, ffn}`` → (parameter tokens, scale tokens) for ``config``."""
        attention = self.attention_param_tokens or config.hidden_size
        ffn = self.ffn_param_tokens or config.intermediate_size
        return {"attention": (attention, self.attention_scale_tokens or attention),
                "ffn": (ffn, self.ffn_scale_tokens or ffn)}


class Pattention(nn.Module):
    """``[..., d_in] → [..., d_out]`` through ``param_tokens`` key / value parameter tokens."""

    new_parameters = ("key_param_tokens", "value_param_tokens")  # read by peft_utils: no Llama checkpoint has them
    lora_target_parameters = ("key_param_tokens", "value_param_tokens")  # LoRA on the token matrices (peft)

    def __init__(self, in_features: int, out_features: int, param_tokens: int, scale_tokens: int,
                 std: float = 0.02) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.scale = math.sqrt(scale_tokens)
        self.std = std
        self.key_param_tokens = nn.Parameter(torch.empty(param_tokens, in_features))
        self.value_param_tokens = nn.Parameter(torch.empty(param_tokens, out_features))

    @property
    def param_tokens(self) -> int:
        return self.key_param_tokens.shape[0]

    def init_parameters(self, init) -> None:
        init.normal_(self.key_param_tokens, mean=0.0, std=self.std)
        init.normal_(self.value_param_tokens, mean=0.0, std=self.std)

    def token_weights(self, x: torch.Tensor) -> torch.Tensor:
        """``Θ(x K_Pᵀ)`` ``[..., n]``, in fp32 (the norm over many tokens)."""
        activated = F.gelu(x.float() @ self.key_param_tokens.float().t())
        norm = activated.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
        return activated / norm * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.token_weights(x) @ self.value_param_tokens.float()).to(x.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, param_tokens={self.param_tokens}, "
                f"scale=√{round(self.scale ** 2)}")


@register_token_mixer("pattention")
class PattentionAttention(HfArchAttention):
    """Softmax attention whose four projections are Pattention layers (``query_tokens``, ``key_tokens``,
    ``value_tokens``, ``output_tokens``, each with its own parameter tokens; no Llama names: nothing loads from a
    standard checkpoint)."""

    attention_features = ()  # TokenFormer's attention is plain softmax attention
    options_class = TokenFormerOptions
    lora_targets = ()  # no nn.Linear to adapt (LoRA reaches the token matrices: Pattention.lora_target_parameters)
    supports_sequence_parallel = False

    def __init__(self, config, layer_idx: int) -> None:
        super().__init__(config, layer_idx)
        if config.attention_bias or config.attention_output_bias:
            raise ValueError("pattention: TokenFormer's projections are parameter tokens, with no bias "
                             "(attention_bias / attention_output_bias must be False)")
        del self.q_proj, self.k_proj, self.v_proj, self.o_proj  # the linear projections this mixer replaces
        tokens, scale = mixer_options(config, "pattention", TokenFormerOptions).counts(config)["attention"]
        hidden, std = config.hidden_size, config.initializer_range
        q_out, kv_out = self.num_heads * self.head_dim, self.num_key_value_heads * self.head_dim
        self.query_tokens = Pattention(hidden, q_out, tokens, scale, std)
        self.key_tokens = Pattention(hidden, kv_out, tokens, scale, std)
        self.value_tokens = Pattention(hidden, kv_out, tokens, scale, std)
        self.output_tokens = Pattention(q_out, hidden, tokens, scale, std)

    def project(self, hidden_states: torch.Tensor, value_bank=None):
        shape = (*hidden_states.shape[:-1], -1, self.head_dim)
        query = self.query_tokens(hidden_states).view(shape)
        key = self.key_tokens(hidden_states).view(shape)
        value = self.value_tokens(hidden_states).view(shape)
        if self.q_norm is not None:
            query, key = self.q_norm(query), self.k_norm(key)
        return query, key, value

    def finish(self, hidden_states: torch.Tensor, attn_output: torch.Tensor, values_seen=None,
               padding_mask=None) -> torch.Tensor:
        return self.output_tokens(attn_output.reshape(*hidden_states.shape[:-1], -1).contiguous())


@register_channel_mixer("pattention")
class PattentionFFN(nn.Module):
    """The feed-forward block as one Pattention layer (TokenFormer's FFN)."""

    lora_targets = ()
    routes_tokens = False

    def __init__(self, config, layer_idx: int) -> None:
        super().__init__()
        tokens, scale = mixer_options(config, "pattention", TokenFormerOptions).counts(config)["ffn"]
        self.ffn = Pattention(config.hidden_size, config.hidden_size, tokens, scale, config.initializer_range)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.ffn(hidden_states)
