"""Kimi Delta Attention (KDA; Kimi Linear, arXiv 2510.26692) as a token mixer.

The gated delta rule with a per-channel (per key dimension) decay, on L2-normalised q/k::

    x ─ q/k/v_proj ─ short conv + SiLU ─ [repeat k/v to the query heads] ─ KDA recurrence ─ o_norm(·, gate) ─ o_proj
    x ─ f_a_proj ─ f_b_proj ─ g = -exp(A_log) · softplus(f + dt_bias)       per head, per key channel  [B, T, H, D]
    x ─ b_proj ─ sigmoid = β                                                 per head                   [B, T, H]
    x ─ g_a_proj ─ g_b_proj = gate;  o_norm(o, gate) = RMSNorm(o) · sigmoid(gate)     per head (over D)

    S_t = (I - β_t k_t k_tᵀ) Diag(exp(g_t)) S_{t-1} + β_t k_t v_tᵀ,      o_t = D^-½ · S_tᵀ q_t

q/k/v/o_proj keep the softmax attention layer's names and shapes (GQA key/value heads are repeated to the query heads
after the conv), so a Llama-family attention layer's weights load unchanged; everything else is new
(``new_parameters``). KDA uses no position encoding (the short conv and the decay carry order): ``position_embeddings``
is not read. Bias placement follows the config: q/k/v ``attention_bias``, o ``attention_output_bias``; the low-rank
decay / gate projections and ``b_proj`` have none (Kimi).

Short conv: ONE depthwise causal conv over the concatenated ``[q | k | v]`` channels (``conv``, weight
``[(H + 2·H_kv)·D, conv_size]``), which is exactly three separate depthwise convs side by side (transformers'
``KimiLinearDeltaAttention.conv1d`` is this same merged conv; the original Kimi checkpoint's ``q_conv1d`` /
``k_conv1d`` / ``v_conv1d`` concatenate into it, see :func:`kda_state_dict_from_kimi`). It runs on the key/value heads
before they are repeated, and its inputs live in the cache's conv state (one state, like ``HfArchLinearAttention``).

Cache: transformers' ``LinearAttentionLayer`` (conv inputs in its conv state 0, the fp32 ``[B, H, D, D]`` matrix in its
recurrent state 0), extended to count the tokens it has taken in (``token_count_cache``). Padding never enters a
state: padded tokens get zero conv inputs, k = v = 0, no decay and β = 0. ``cu_seqlens`` (B = 1) runs packed sequences
separately, the conv's taps stopping at each sequence start.

Options (``config.mixer_options["kda"]``, :class:`KDAOptions`): conv width, the ranks of the decay and output-gate
bottlenecks (Kimi: head_dim), q/k L2 norm (Kimi: on), the output gate's activation (Kimi: sigmoid) and the
"safe gate" lower bound of fla / GLM-5-Next (``g = lower_bound · sigmoid(exp(A_log) · (f + dt_bias))``; Kimi: off).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels.kda import kda
from .attention import repeat_kv
from .attention_transfer import softmax_teacher, transfer_loss
from .auxiliary import mixer_result
from .mixer_registry import mixer_options, register_token_mixer
from .norm import HfArchRMSNorm, build_qk_norms
from .short_conv import ShortConvolution
from .recurrent_inputs import recurrent_inputs

__all__ = ["KDAGatedRMSNorm", "KDAOptions", "KimiDeltaAttention", "kda_state_dict_from_kimi"]

KDA_GATE_ACTIVATIONS = ("sigmoid", "silu")


def _kda_positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


@dataclass
class KDAOptions:
    """Options of a KDA layer (``config.mixer_options["kda"]``).

    conv_size: width of the depthwise causal short conv on q/k/v (Kimi: 4).
    decay_low_rank_dim: rank of the decay projection ``f_a_proj`` → ``f_b_proj``; None: head_dim (Kimi).
    gate_low_rank_dim: rank of the output-gate projection ``g_a_proj`` → ``g_b_proj``; None: head_dim (Kimi).
    use_qk_l2norm: L2-normalise q and k per head inside the recurrence (Kimi: True; eps 1e-6 inside the sqrt).
    gate_activation: the output gate's activation in ``o_norm``: "sigmoid" (Kimi) or "silu" (GLA / Gated DeltaNet).
    gate_lower_bound: None (Kimi): ``g = -exp(A_log)·softplus(f + dt_bias)``, unbounded below; a negative number:
        the "safe gate" ``g = gate_lower_bound · sigmoid(exp(A_log)·(f + dt_bias))`` in (gate_lower_bound, 0)
        (fla's ``safe_gate``, GLM-5-Next's ``linear_lower_bound``; A_log is then initialised to 0).
    """

    conv_size: int = 4
    decay_low_rank_dim: int | None = None
    gate_low_rank_dim: int | None = None
    use_qk_l2norm: bool = True
    gate_activation: str = "sigmoid"
    gate_lower_bound: float | None = None

    def __post_init__(self) -> None:
        if not _kda_positive_int(self.conv_size):
            raise ValueError(f"KDAOptions.conv_size must be a positive integer (KDA always has its short conv), got "
                             f"{self.conv_size!r}")
        for name in ("decay_low_rank_dim", "gate_low_rank_dim"):
            value = getattr(self, name)
            if value is not None and not _kda_positive_int(value):
                raise ValueError(f"KDAOptions.{name} must be None (head_dim) or a positive integer, got {value!r}")
        if not isinstance(self.use_qk_l2norm, bool):
            raise ValueError(f"KDAOptions.use_qk_l2norm must be a bool, got {self.use_qk_l2norm!r}")
        if self.gate_activation not in KDA_GATE_ACTIVATIONS:
            raise ValueError(f"KDAOptions.gate_activation must be one of {KDA_GATE_ACTIVATIONS}, got "
                             f"{self.gate_activation!r}")
        bound = self.gate_lower_bound
        if bound is not None and (isinstance(bound, bool) or not isinstance(bound, (int, float))
                                  or not math.isfinite(bound) or bound >= 0):
            raise ValueError(f"KDAOptions.gate_lower_bound must be None or a negative number (the log decay's lower "
                             f"bound, e.g. -5.0), got {bound!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class KDAGatedRMSNorm(HfArchRMSNorm):
    """``RMSNorm(x) · act(gate)`` over the last dim, all in fp32, cast back to x's dtype (Kimi's ``o_norm``, fla's
    ``FusedRMSNormGated``). ``activation``: "sigmoid" (Kimi) or "silu". The weight initialises to ones (an RMSNorm)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6, activation: str = "sigmoid") -> None:
        super().__init__(hidden_size, eps=eps)
        if activation not in KDA_GATE_ACTIVATIONS:
            raise ValueError(f"KDAGatedRMSNorm activation must be one of {KDA_GATE_ACTIVATIONS}, got {activation!r}")
        self.activation = activation

    def forward(self, hidden_states: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        x = hidden_states.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        x = self.weight.float() * x
        if gate is not None:
            gate = gate.float()
            x = x * (torch.sigmoid(gate) if self.activation == "sigmoid" else F.silu(gate))
        return x.to(input_dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, activation={self.activation}"


@register_token_mixer("kda")
class KimiDeltaAttention(nn.Module):
    """KDA token mixer: ``forward(hidden [B, T, hidden], attention_mask=[B, past + T] padding mask or None,
    past_key_values=cache with a LinearAttentionLayer at layer_idx, cu_seqlens=..., position_in_sequence=...)`` →
    (``[B, T, hidden]``, None)."""

    layer_types = ("linear_attention",)  # its cache entry: conv state + recurrent state
    attention_backends = ()  # calls no attention backend
    options_class = KDAOptions
    supports_sequence_parallel = True  # LASP-2: its op exchanges states across ranks, its conv takes the halo
    # Read by peft_utils (names relative to this module). q/k/v/o come from the source checkpoint; the low-rank decay
    # and gate projections (rank head_dim) and b_proj (H outputs) are small and no LoRA targets.
    lora_targets = ("q_proj", "k_proj", "v_proj", "o_proj")
    new_parameters = ("conv", "f_a_proj", "f_b_proj", "A_log", "dt_bias", "b_proj", "g_a_proj", "g_b_proj", "o_norm")

    def __init__(self, config, layer_idx: int, options: KDAOptions | None = None) -> None:
        super().__init__()
        options = mixer_options(config, "kda", KDAOptions) if options is None else options
        if not isinstance(options, KDAOptions):
            raise TypeError(f"options must be a KDAOptions, got {type(options).__name__}")
        self.config = config
        self.options = options
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_heads = config.num_attention_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.num_key_value_groups = self.num_heads // self.num_key_value_heads
        self.scaling = config.softmax_scale(self.head_dim)
        self.use_qk_l2norm = options.use_qk_l2norm
        self.gate_lower_bound = options.gate_lower_bound

        hidden, bias, H, H_kv, D = (config.hidden_size, config.attention_bias, self.num_heads,
                                    self.num_key_value_heads, self.head_dim)
        self.q_proj = nn.Linear(hidden, H * D, bias=bias)
        self.k_proj = nn.Linear(hidden, H_kv * D, bias=bias)
        self.v_proj = nn.Linear(hidden, H_kv * D, bias=bias)
        self.o_proj = nn.Linear(H * D, hidden, bias=config.attention_output_bias)
        # A source with q/k RMSNorm (Qwen3, OLMo-2) keeps it, after the conv (as the GLA / Gated DeltaNet layers).
        self.q_norm, self.k_norm = build_qk_norms(config, H, H_kv, D)
        self.conv = ShortConvolution((H + 2 * H_kv) * D, options.conv_size)  # [q | k | v] channels, one conv

        decay_rank = options.decay_low_rank_dim or D
        gate_rank = options.gate_low_rank_dim or D
        self.f_a_proj = nn.Linear(hidden, decay_rank, bias=False)
        self.f_b_proj = nn.Linear(decay_rank, H * D, bias=False)
        self.A_log = nn.Parameter(torch.empty(H))  # per head
        self.dt_bias = nn.Parameter(torch.empty(H * D))  # per head and key channel
        self.b_proj = nn.Linear(hidden, H, bias=False)
        self.g_a_proj = nn.Linear(hidden, gate_rank, bias=False)
        self.g_b_proj = nn.Linear(gate_rank, H * D, bias=False)
        self.o_norm = KDAGatedRMSNorm(D, eps=config.rms_norm_eps, activation=options.gate_activation)

    @torch.no_grad()
    def init_parameters(self, init) -> None:
        """A_log and dt_bias (transformers.initialization-style functions, so loaded weights are never overwritten),
        as Kimi / fla / Mamba-2: A = exp(A_log) uniform in [1, 16] per head; dt log-uniform in [1e-3, 0.1] per channel
        (clamped at 1e-4) and dt_bias = softplus⁻¹(dt). With the safe gate, A_log = 0 (GLM-5-Next / fla).
        The projections (nn.Linear), the norm (ones) and the conv (its own init_parameters) are initialised where
        transformers visits them."""
        if self.gate_lower_bound is None:
            init.copy_(self.A_log, torch.empty_like(self.A_log).uniform_(1, 16).log())
        else:
            init.zeros_(self.A_log)
        dt = torch.exp(torch.empty_like(self.dt_bias).uniform_(math.log(1e-3), math.log(0.1))).clamp(min=1e-4)
        init.copy_(self.dt_bias, dt + torch.log(-torch.expm1(-dt)))  # softplus⁻¹(dt)

    # -- pieces -------------------------------------------------------------------------------------------------

    def log_decay(self, x: torch.Tensor) -> torch.Tensor:
        """Per-channel log decay ``g [B, T, H, D]`` (fp32, <= 0) of hidden states ``x [B, T, hidden]``."""
        B, T, _ = x.shape
        f = self.f_b_proj(self.f_a_proj(x)).float() + self.dt_bias.float()
        f = f.view(B, T, self.num_heads, self.head_dim)
        rate = self.A_log.float().exp()[:, None]  # [H, 1]
        if self.gate_lower_bound is None:
            return -rate * F.softplus(f)  # softplus(x) = x above 20, as Kimi / fla
        return self.gate_lower_bound * torch.sigmoid(rate * f)

    def write_strength(self, x: torch.Tensor) -> torch.Tensor:
        """β ``[B, T, H]`` (fp32) in (0, 1)."""
        return torch.sigmoid(self.b_proj(x).float())

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
        """attention_mask: the 2-D ``[B, past + T]`` padding mask (1 = token) or None (a 4-D mask is ignored: KDA is
        causal by construction). position_embeddings are read only by the attention-transfer teacher (KDA has no
        RoPE). Returns ``(output, None)``; with ``attention_transfer``, ``(softmax teacher's output, None,
        {"transfer_loss": MSE(KDA output, teacher)})`` (``layers.attention_transfer``; no cache allowed)."""
        x = hidden_states
        B, T, _ = x.shape
        H, H_kv, D = self.num_heads, self.num_key_value_heads, self.head_dim
        inputs = recurrent_inputs(self, T, attention_mask, past_key_values, attention_transfer)
        key_mask, token, layer = inputs.key_mask, inputs.token, inputs.cache_layer

        qkv = torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], dim=-1)
        if token is not None:
            qkv = qkv * token.unsqueeze(-1).to(qkv.dtype)  # padding contributes nothing to the conv state
        past_inputs = None
        if layer is not None:
            had_past = layer.has_previous_state[0]
            # Returns [cached inputs | new inputs] on continuation (the cached copy is updated in place).
            full = layer.update_conv_state(qkv.transpose(1, 2), 0, conv_kernel_size=self.conv.kernel_size)
            past_inputs = full[..., : full.shape[-1] - T] if had_past else None
        qkv = self.conv(qkv, past_inputs, position_in_sequence if cu_seqlens is not None else None)
        q, k, v = qkv.split([H * D, H_kv * D, H_kv * D], dim=-1)
        q, k = q.view(B, T, H, D), k.view(B, T, H_kv, D)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        k = repeat_kv(k.transpose(1, 2), self.num_key_value_groups).transpose(1, 2)
        v = repeat_kv(v.view(B, T, H_kv, D).transpose(1, 2), self.num_key_value_groups).transpose(1, 2)

        g = self.log_decay(x)
        beta = self.write_strength(x)
        if token is not None:  # padded tokens: no write, no decay
            keep = token[..., None, None]
            k, v, g = k * keep.to(k.dtype), v * keep.to(v.dtype), g * keep.to(g.dtype)
            beta = beta * token[..., None].to(beta.dtype)

        initial_state = None
        if layer is not None and layer.is_recurrent_states_initialized[0]:
            initial_state = layer.recurrent_states[0]
        o, final_state = kda(q, k, v, g, beta, scale=self.scaling, initial_state=initial_state,
                             output_final_state=layer is not None, cu_seqlens=cu_seqlens,
                             use_qk_l2norm=self.use_qk_l2norm)
        if layer is not None:
            layer.update_recurrent_state(final_state, 0)
            layer.add_tokens(T)  # read by cached_token_count (all-linear models: the cache's sequence length)

        gate = self.g_b_proj(self.g_a_proj(x)).view(B, T, H, D)
        out = self.o_proj(self.o_norm(o, gate).reshape(B, T, H * D))
        if not attention_transfer:
            return out, None
        teacher = softmax_teacher(self, x, position_embeddings, key_mask, cu_seqlens)
        return mixer_result(teacher, None, {"transfer_loss": transfer_loss(out, teacher, token)})


def kda_state_dict_from_kimi(state_dict: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """A Kimi Linear KDA layer's weights (keys under ``prefix``) → this layer's keys (same prefix), either layout:

    - transformers' ``KimiLinearDeltaAttention``: ``conv1d.weight [3·H·D, 1, K]``, ``forget_gate.{f_a_proj,
      f_b_proj,dt_bias,A_log}`` with ``A_log [1, 1, H, 1]``;
    - Moonshot's checkpoint / fla: ``{q,k,v}_conv1d.weight [H·D, 1, K]`` each, ``f_a_proj``, ``f_b_proj``,
      ``dt_bias``, ``A_log [1, 1, H, 1]`` directly on the layer.

    Everything else (q/k/v/o_proj, b_proj, g_a_proj, g_b_proj, o_norm) keeps its name. Kimi has no GQA, so the
    merged conv's ``[q | k | v]`` channel order is ours."""
    out = {}
    convs = {}
    for key, value in state_dict.items():
        if not key.startswith(prefix):
            continue
        name = key[len(prefix):]
        if name.startswith("forget_gate."):
            name = name[len("forget_gate."):]
        if name == "conv1d.weight":
            out[prefix + "conv.weight"] = value.reshape(value.shape[0], value.shape[-1])
            continue
        if name in ("q_conv1d.weight", "k_conv1d.weight", "v_conv1d.weight"):
            convs[name[0]] = value.reshape(value.shape[0], value.shape[-1])
            continue
        if name == "A_log":
            value = value.reshape(-1)
        out[prefix + name] = value
    if convs:
        if sorted(convs) != ["k", "q", "v"]:
            raise ValueError(f"kda_state_dict_from_kimi: found {sorted(convs)} of the q/k/v_conv1d weights under "
                             f"{prefix!r}; all three are needed")
        out[prefix + "conv.weight"] = torch.cat([convs["q"], convs["k"], convs["v"]], dim=0)
    return out
