"""Lightning attention (TransNormerLLM, Qin et al., "Scaling TransNormer to 175 Billion Parameters") as a token mixer.

Linear attention with a fixed exponential decay per head, which keeps attention from spreading thin over a long
context (attention dilution), relative positions through LRPE, a normalised and gated output::

    x ─ q/k_proj ─ act ─ [LRPE: rotate by position] ─┐
    x ─ v_proj ────────────────────────────────────── lightning  S_t = λ_h S_{t-1} + k_tᵀ v_t,  o_t = D^-½ q_t S_t
    o ─ SRMSNorm (over all heads, no weight) ⊙ act(x W_u) ─ o_proj

The decays are TransNormerLLM's, ``log λ_h = -(8h/H)·(1 - l/L)`` for head h of layer l of L (head 0 never forgets,
deeper layers forget less; buffers, not parameters). LRPE is applied in its real form, the rotary rotation of q and
k by the backbone's RoPE (``q_s·k_t`` then depends on ``s - t`` only), so the decayed sum keeps relative positions.
SRMSNorm is ``x / RMS(x)``, TransNormerLLM's weightless "tensor normalisation". q/k/v/o keep a softmax attention
layer's names and shapes (GQA key/value heads repeated to the query heads), so ``--to lightning`` copies them from a
Llama-family checkpoint; ``u_proj`` is new. Kernels: ``kernels/lightning`` (naive, chunked intra/inter-block,
recurrent decode; fla's simple_gla on CUDA).

Cache: transformers' ``LinearAttentionLayer`` (the fp32 ``[B, H, D, D]`` state in recurrent state 0), extended to
count its tokens. Padding never enters the state: padded tokens get k = v = 0 and a log decay of 0 (the kernels take
the decay per head or per token), so they neither write nor decay.

Options (``config.mixer_options["lightning"]``, :class:`LightningOptions`): the decay base (8), the q/k activation
(TransNormerLLM: SiLU), LRPE on or off, and the output gate's activation (TransNormerLLM: none, ``x W_u`` as it is).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels.lightning.chunk import lightning_log_decay
from ..kernels.ops import lightning_attention
from .attention import repeat_kv
from .attention_transfer import softmax_teacher, transfer_loss
from .auxiliary import mixer_result
from .mixer_registry import mixer_options, register_token_mixer
from .rope import apply_rotary_pos_emb
from .recurrent_inputs import recurrent_inputs

__all__ = ["LightningAttention", "LightningOptions"]

LIGHTNING_ACTIVATIONS = ("silu", "identity")
LIGHTNING_GATES = ("identity", "sigmoid", "silu", "none")


@dataclass
class LightningOptions:
    """Options of a Lightning layer (``config.mixer_options["lightning"]``).

    decay_base: b in ``log λ_h = -(b·h/H)(1 - l/L)`` (TransNormerLLM: 8); 0 gives plain causal linear attention.
    qk_activation: on q and k before LRPE: "silu" (TransNormerLLM) or "identity".
    lrpe: rotate q/k by position (LRPE's real form, the backbone's RoPE), so scores see relative positions.
    output_gate: the gate's activation on ``x W_u``: "identity" (TransNormerLLM), "sigmoid", "silu", or "none"
        (no gate, no ``u_proj``).
    """

    decay_base: float = 8.0
    qk_activation: str = "silu"
    lrpe: bool = True
    output_gate: str = "identity"

    def __post_init__(self) -> None:
        if not isinstance(self.decay_base, (int, float)) or isinstance(self.decay_base, bool) or self.decay_base < 0:
            raise ValueError(f"LightningOptions.decay_base must be a number >= 0, got {self.decay_base!r}")
        if self.qk_activation not in LIGHTNING_ACTIVATIONS:
            raise ValueError(f"LightningOptions.qk_activation must be one of {LIGHTNING_ACTIVATIONS}, got "
                             f"{self.qk_activation!r}")
        if not isinstance(self.lrpe, bool):
            raise ValueError(f"LightningOptions.lrpe must be a bool, got {self.lrpe!r}")
        if self.output_gate not in LIGHTNING_GATES:
            raise ValueError(f"LightningOptions.output_gate must be one of {LIGHTNING_GATES}, got {self.output_gate!r}")


def srms_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """TransNormerLLM's SRMSNorm, ``x / RMS(x)`` over the last dim, in fp32."""
    wide = x.to(torch.promote_types(x.dtype, torch.float32))
    return (wide * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


@register_token_mixer("lightning")
class LightningAttention(nn.Module):
    """Lightning token mixer: ``forward(hidden [B, T, hidden], position_embeddings=(cos, sin), attention_mask=[B,
    past + T] padding mask or None, past_key_values=cache, cu_seqlens=...)`` → (``[B, T, hidden]``, None)."""

    layer_types = ("linear_attention",)  # its cache entry: a recurrent state
    attention_backends = ()
    options_class = LightningOptions
    supports_sequence_parallel = True  # LASP-2: its op exchanges states across ranks
    lora_targets = ("q_proj", "k_proj", "v_proj", "o_proj", "u_proj")
    new_parameters = ("u_proj",)

    def __init__(self, config, layer_idx: int, options: LightningOptions | None = None) -> None:
        super().__init__()
        options = mixer_options(config, "lightning", LightningOptions) if options is None else options
        if not isinstance(options, LightningOptions):
            raise TypeError(f"options must be a LightningOptions, got {type(options).__name__}")
        self.config = config
        self.options = options
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_heads = config.num_attention_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.num_key_value_groups = self.num_heads // self.num_key_value_heads
        self.scaling = config.softmax_scale(self.head_dim)  # the attention-transfer teacher's (softmax) scale
        hidden, H, H_kv, D = config.hidden_size, self.num_heads, self.num_key_value_heads, self.head_dim
        self.q_proj = nn.Linear(hidden, H * D, bias=config.attention_bias)
        self.k_proj = nn.Linear(hidden, H_kv * D, bias=config.attention_bias)
        self.v_proj = nn.Linear(hidden, H_kv * D, bias=config.attention_bias)
        self.o_proj = nn.Linear(H * D, hidden, bias=config.attention_output_bias)
        self.u_proj = nn.Linear(hidden, H * D, bias=False) if options.output_gate != "none" else None
        # Fixed by the schedule: computed on first use on the layer's device, never stored (a buffer would be left
        # uninitialised by transformers' meta-device loading).
        self._log_decay: torch.Tensor | None = None

    @property
    def log_decay(self) -> torch.Tensor:
        """The heads' log decays ``[H]`` (fp32), on the layer's device."""
        device = self.q_proj.weight.device
        if self._log_decay is None or self._log_decay.device != device:
            self._log_decay = lightning_log_decay(self.num_heads, self.layer_idx, self.config.num_hidden_layers,
                                                  base=float(self.options.decay_base), device=device)
        return self._log_decay

    def _act(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(x) if self.options.qk_activation == "silu" else x

    def _gate(self, x: torch.Tensor) -> torch.Tensor | None:
        if self.u_proj is None:
            return None
        u = self.u_proj(x)
        kind = self.options.output_gate
        return torch.sigmoid(u) if kind == "sigmoid" else F.silu(u) if kind == "silu" else u

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        past_key_values=None,
        cu_seqlens: torch.LongTensor | None = None,
        attention_transfer: bool = False,
        **kwargs,
    ) -> tuple:
        """Returns ``(output, None)``; with ``attention_transfer``, ``(softmax teacher's output, None,
        {"transfer_loss": MSE(Lightning output, teacher)})`` (no cache allowed)."""
        x = hidden_states
        B, T, _ = x.shape
        H, H_kv, D = self.num_heads, self.num_key_value_heads, self.head_dim
        inputs = recurrent_inputs(self, T, attention_mask, past_key_values, attention_transfer)
        key_mask, token, layer = inputs.key_mask, inputs.token, inputs.cache_layer

        q = self._act(self.q_proj(x)).view(B, T, H, D)
        k = self._act(self.k_proj(x)).view(B, T, H_kv, D)
        v = self.v_proj(x).view(B, T, H_kv, D)
        if self.options.lrpe:
            if position_embeddings is None:
                raise ValueError(f"layer {self.layer_idx}: Lightning with lrpe=True needs position_embeddings")
            q, k = (t.transpose(1, 2) for t in apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2),
                                                                     *position_embeddings))
        k = repeat_kv(k.transpose(1, 2), self.num_key_value_groups).transpose(1, 2)
        v = repeat_kv(v.transpose(1, 2), self.num_key_value_groups).transpose(1, 2)

        decay = self.log_decay
        if token is not None:  # padded tokens neither write (k = v = 0) nor decay the state (log decay 0)
            keep = token[..., None]
            k, v = k * keep[..., None].to(k.dtype), v * keep[..., None].to(v.dtype)
            decay = decay * keep.to(decay.dtype)  # [B, T, H]
        initial_state = None
        if layer is not None and layer.is_recurrent_states_initialized[0]:
            initial_state = layer.recurrent_states[0]
        o, final_state = lightning_attention(q, k, v, decay, initial_state=initial_state,
                                             output_final_state=layer is not None, cu_seqlens=cu_seqlens)
        if layer is not None:
            layer.update_recurrent_state(final_state, 0)
            layer.add_tokens(T)

        o = srms_norm(o.reshape(B, T, H * D), self.config.rms_norm_eps)
        gate = self._gate(x)
        out = self.o_proj(o * gate if gate is not None else o)
        if not attention_transfer:
            return out, None
        teacher = softmax_teacher(self, x, position_embeddings, key_mask, cu_seqlens)
        return mixer_result(teacher, None, {"transfer_loss": transfer_loss(out, teacher, token)})
