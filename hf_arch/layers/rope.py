"""Rotary position embedding driven by ``config.rope_parameters`` (default, linear, dynamic, yarn, llama3, …), one
set of parameters for every layer or one per layer type (Gemma 3, OLMo-3: ``{"sliding_attention": {...},
"full_attention": {...}}``)."""

import copy

import torch
from torch import nn
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, dynamic_rope_update

from ..configuration import rope_per_layer_type


class HfArchRotaryEmbedding(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        self.config = config
        self.max_seq_len_cached = config.max_position_embeddings
        self.original_max_seq_len = config.max_position_embeddings
        self.rope_type = config.rope_parameters.get("rope_type", "default")
        init_fn = self.compute_default_rope_parameters if self.rope_type == "default" else ROPE_INIT_FUNCTIONS[self.rope_type]
        inv_freq, self.attention_scaling = init_fn(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("original_inv_freq", inv_freq.clone(), persistent=False)

    @staticmethod
    def compute_default_rope_parameters(config, device=None, **kwargs) -> tuple[torch.Tensor, float]:
        base = config.rope_parameters["rope_theta"]
        dim = config.head_dim
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float) / dim))
        return inv_freq, 1.0

    @torch.no_grad()
    @dynamic_rope_update
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.attention_scaling).to(x.dtype), (emb.sin() * self.attention_scaling).to(x.dtype)


class LayerTypeRotaryEmbeddings(nn.Module):
    """One :class:`HfArchRotaryEmbedding` per layer type; ``forward`` returns ``{layer type: (cos, sin)}``."""

    def __init__(self, config) -> None:
        super().__init__()
        embeddings = {}
        for layer_type, parameters in rope_per_layer_type(config.rope_parameters).items():
            view = copy.copy(config)  # the type's parameters where the init functions read them
            view.rope_parameters = dict(parameters)
            embeddings[layer_type] = HfArchRotaryEmbedding(view)
        self.per_type = nn.ModuleDict(embeddings)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> dict:
        return {layer_type: embedding(x, position_ids) for layer_type, embedding in self.per_type.items()}


def build_rotary_embedding(config) -> nn.Module:
    if rope_per_layer_type(config.rope_parameters):
        return LayerTypeRotaryEmbeddings(config)
    return HfArchRotaryEmbedding(config)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(q, k, cos, sin):
    """q, k: [B, H, T, D]; cos, sin: [B, T, D]."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
