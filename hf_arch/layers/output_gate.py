"""Query-dependent output gate on attention (Qiu et al., "Gated Attention for LLMs", position G1).

``o = scale · σ(x W_g + b) ⊙ attn``, computed from the layer's normed input ``x`` and applied per head (headwise:
one scalar per head) or per channel (elementwise) before ``o_proj``. With ``scale = 2`` and ``W_g = 0, b = 0`` the
gate is exactly 1, so inserting it into a pretrained model keeps the model's function.
"""

import torch
from torch import nn
from transformers import initialization as init  # flag-aware: never overwrites weights loaded from a checkpoint

from .attention_registry import AttentionFeature, register_attention_feature


@register_attention_feature("output_gate")
class AttentionOutputGate(AttentionFeature):
    # Read by peft_utils: LoRA adapts a full-rank gate projection (a low-rank one is an nn.Sequential and is
    # left out); every parameter is new to a Llama checkpoint. "proj" alone says little, so LoRA names carry this
    # module's attribute name ("output_gate.proj").
    lora_targets = ("proj",)
    lora_targets_qualified = True
    new_parameters = ("*",)

    def __init__(self, config, layer_idx: int | None = None) -> None:
        super().__init__()
        self.granularity = config.attn_output_gate
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.scale = float(config.attn_output_gate_scale)
        out_features = self.num_heads if self.granularity == "headwise" else self.num_heads * self.head_dim
        rank = config.attn_output_gate_rank
        bias = config.attn_output_gate_bias
        if rank is None:
            self.proj = nn.Linear(config.hidden_size, out_features, bias=bias)
        else:  # low rank caps the parameter count of elementwise gates
            self.proj = nn.Sequential(
                nn.Linear(config.hidden_size, rank, bias=False), nn.Linear(rank, out_features, bias=bias)
            )
        # Tag the projections: transformers initialises leaf modules, never this parameter-less container.
        linears = self._linears()
        for linear in linears:
            linear.output_gate_last = linear is linears[-1]

    def scores(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Gate values in (0, scale): [B, T, H] (headwise) or [B, T, H·D] (elementwise)."""
        return self.scale * torch.sigmoid(self.proj(hidden_states))

    def forward(self, hidden_states: torch.Tensor, attn_output: torch.Tensor) -> torch.Tensor:
        """hidden_states: [B, T, hidden]; attn_output: [B, T, H·D] → gated [B, T, H·D]."""
        gate = self.scores(hidden_states).to(attn_output.dtype)
        if self.granularity == "headwise":
            shape = attn_output.shape
            return (attn_output.view(*shape[:-1], self.num_heads, self.head_dim) * gate.unsqueeze(-1)).view(shape)
        return attn_output * gate

    def adjust_output(self, hidden_states, attn_output, values_seen=None, padding_mask=None) -> torch.Tensor:
        """``[B, T, H, D]`` → gated, same shape."""
        return self(hidden_states, attn_output.reshape(*attn_output.shape[:-2], -1)).view(attn_output.shape)

    def reset_parameters(self, mode: str, std: float, bias_init: float) -> None:
        """``zeros``: identity-like (needs scale 2 to be exactly 1); ``normal``: from-scratch training."""
        for linear in self._linears():
            self.init_linear(linear, mode, std, bias_init)

    def _linears(self) -> list[nn.Linear]:
        return [self.proj] if isinstance(self.proj, nn.Linear) else list(self.proj)

    @staticmethod
    def init_linear(linear: nn.Linear, mode: str, std: float, bias_init: float) -> None:
        if mode == "zeros" and linear.output_gate_last:  # a zero last factor makes a low-rank product zero too
            init.zeros_(linear.weight)
        else:
            init.normal_(linear.weight, mean=0.0, std=std)
        if linear.bias is not None:
            init.constant_(linear.bias, bias_init)
