"""The backbone's configuration: one decoder whose per-layer mixers come from the config.

Every variant is a subclass with its own ``model_type`` (prefix ``hfa_``) and defaults. The fields here are the
Llama-family ones (so a Llama/Mistral/Qwen2/Qwen3 config maps onto them field by field) plus the options of the
mixers the backbone knows. Each mixer reads only its own slice (``attn_output_gate*`` for the output gate, …).
"""

from __future__ import annotations

try:  # transformers >= 5 renamed the base class; keep the old name working for remote-code users.
    from transformers import PreTrainedConfig
except ImportError:  # pragma: no cover
    from transformers import PretrainedConfig as PreTrainedConfig

# Token-mixer layer types this backbone builds (transformers' own names, so DynamicCache(config=...) understands them).
# "hybrid_sliding" is transformers' name for a layer holding a linear-attention state plus a sliding-window KV cache:
# a linear layer with an intra-layer window branch (linear_attn_hybrid = liger | lizard).
ATTENTION_LAYER_TYPES = ("full_attention", "sliding_attention")
LINEAR_LAYER_TYPES = ("linear_attention", "hybrid_sliding")
SUPPORTED_LAYER_TYPES = ATTENTION_LAYER_TYPES + LINEAR_LAYER_TYPES
# Channel-mixer layer types.
SUPPORTED_MLP_LAYER_TYPES = ("dense",)
OUTPUT_GATE_GRANULARITIES = ("headwise", "elementwise")
OUTPUT_GATE_ACTIVATIONS = ("sigmoid",)
OUTPUT_GATE_INITS = ("normal", "zeros")
LINEAR_ATTN_TYPES = ("gla", "gated_deltanet")
LINEAR_ATTN_GATES = ("low_rank", "scalar")
LINEAR_ATTN_OUTPUT_NORMS = ("gated_rmsnorm", "rmsnorm", "none")
LINEAR_ATTN_QK_NORMS = ("none", "l2")
LINEAR_ATTN_HYBRIDS = ("none", "liger", "lizard")


class HfArchConfig(PreTrainedConfig):
    r"""Configuration of the hf-arch decoder backbone.

    Args (beyond the usual Llama fields):
        attention_output_bias: bias on ``o_proj`` (Llama ties it to ``attention_bias``; Qwen2 has qkv bias only).
        qk_norm: RMSNorm over ``head_dim`` on queries and keys before RoPE (Qwen3).
        layer_types: one token-mixer type per layer (``full_attention`` | ``sliding_attention``).
        mlp_layer_types: one channel-mixer type per layer (``dense``).
        sliding_window: window size for ``sliding_attention`` layers.
        attn_output_gate: ``None`` (no gate), ``"headwise"`` (one scalar per head) or ``"elementwise"`` (one per
            channel): the query-dependent gate ``o = s·act(x W_g) ⊙ SDPA(q, k, v)`` applied before ``o_proj``
            (position G1 of Qiu et al.). ``x`` is the layer's normed input.
        attn_output_gate_bias: bias on the gate projection.
        attn_output_gate_rank: low-rank gate projection ``x → r → gate`` (``None`` for full rank).
        attn_output_gate_activation: ``"sigmoid"``.
        attn_output_gate_scale: ``s`` above. ``2.0`` with a zero-initialised projection makes the gate exactly 1
            (``2·σ(0)``), which is what conversions use to keep the source model's function.
        attn_output_gate_init: ``"normal"`` (from scratch, ``initializer_range``) or ``"zeros"`` (identity-like).
        attn_output_gate_bias_init: initial value of the gate bias.
        attn_output_gate_lr_scale: learning-rate multiplier the recipes apply to gate parameters (retrofitted gates
            barely move at the base LR, as the Gated Attention authors report).

    Linear-attention layers (``linear_attention`` / ``hybrid_sliding`` in ``layer_types``) read the ``linear_attn_*``
    fields. They keep the attention layer's ``q/k/v/o_proj`` shapes (``num_attention_heads`` query heads,
    ``num_key_value_heads`` key/value heads repeated to the query heads, ``head_dim``), so a softmax layer's weights
    map onto them key for key.
        linear_attn_type: ``"gla"`` (per-key-channel forget gate) or ``"gated_deltanet"`` (delta rule, scalar decay
            ``-exp(A_log)·softplus(a + dt_bias)`` and write strength ``β = σ(b)`` per head).
        linear_attn_gate: GLA gate form: ``"low_rank"`` (``x → r → H·D``, the GLA paper) or ``"scalar"`` (one value
            per head and token, Lizard's σ(W_γ x)); log gate ``= logsigmoid(·) / linear_attn_gate_normalizer``.
        linear_attn_gate_low_rank_dim: ``r`` above. linear_attn_gate_normalizer: the GLA paper's τ (16).
        linear_attn_conv_size: depthwise causal short-conv width over q, k, v (0 = none), SiLU after it.
        linear_attn_qk_norm: ``"l2"`` normalises q and k per head (Gated DeltaNet); ``"none"``.
        linear_attn_output_norm: ``"gated_rmsnorm"`` (``RMSNorm(o) · SiLU(x W)``, per head), ``"rmsnorm"``, ``"none"``.
        linear_attn_use_rope: rotate q/k of the linear branch (off by default: the decay carries position).
        linear_attn_chunk_size: chunk length of the chunked kernels.
        linear_attn_hybrid: intra-layer hybrid: ``"none"``; ``"liger"`` (``w_lin·linear + w_win·SWA`` with the same
            q/k/v); ``"lizard"`` (SWA with ``linear_attn_num_sinks`` learnable sink logits, ``linear + α·SWA`` with α
            learnable). The window is ``sliding_window``; such layers are stored as ``hybrid_sliding``.
        linear_attn_mix_weights: ``[w_lin, w_win]`` (``w_win`` is α's initial value for lizard).
        linear_attn_num_sinks: learnable sink logits in the window branch's softmax denominator.
        full_attention_layers / linear_to_full_ratio: shorthands for ``layer_types`` of a linear variant: the listed
            layers (or every ``(ratio + 1)``-th layer) get full attention, the rest linear attention.
    """

    model_type = "hfa_base"
    keys_to_ignore_at_inference = ["past_key_values"]
    default_theta = 10_000.0

    # transformers turns every config subclass into a dataclass whose generated __eq__ compares only the base
    # class's declared fields; our fields live in __dict__, so compare that (as PreTrainedConfig itself does).
    def __eq__(self, other) -> bool:
        return isinstance(other, PreTrainedConfig) and self.__dict__ == other.__dict__

    __hash__ = None

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.__eq__ = HfArchConfig.__eq__

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 768,
        intermediate_size: int = 2048,
        num_hidden_layers: int = 12,
        num_attention_heads: int = 12,
        num_key_value_heads: int | None = None,
        head_dim: int | None = None,
        hidden_act: str = "silu",
        max_position_embeddings: int = 2048,
        initializer_range: float = 0.02,
        rms_norm_eps: float = 1e-6,
        use_cache: bool = True,
        pad_token_id: int | None = None,
        bos_token_id: int | None = 1,
        eos_token_id: int | list[int] | None = 2,
        tie_word_embeddings: bool = False,
        rope_parameters: dict | None = None,
        attention_bias: bool = False,
        attention_output_bias: bool | None = None,
        attention_dropout: float = 0.0,
        mlp_bias: bool = False,
        qk_norm: bool = False,
        layer_types: list[str] | None = None,
        mlp_layer_types: list[str] | None = None,
        sliding_window: int | None = None,
        attn_output_gate: str | None = None,
        attn_output_gate_bias: bool = False,
        attn_output_gate_rank: int | None = None,
        attn_output_gate_activation: str = "sigmoid",
        attn_output_gate_scale: float = 1.0,
        attn_output_gate_init: str = "normal",
        attn_output_gate_bias_init: float = 0.0,
        attn_output_gate_lr_scale: float = 1.0,
        linear_attn_type: str = "gla",
        linear_attn_gate: str = "low_rank",
        linear_attn_gate_low_rank_dim: int = 16,
        linear_attn_gate_normalizer: float = 16.0,
        linear_attn_conv_size: int = 0,
        linear_attn_qk_norm: str = "none",
        linear_attn_output_norm: str = "gated_rmsnorm",
        linear_attn_use_rope: bool = False,
        linear_attn_chunk_size: int = 64,
        linear_attn_hybrid: str = "none",
        linear_attn_mix_weights: list[float] | tuple[float, float] = (0.5, 0.5),
        linear_attn_num_sinks: int = 0,
        full_attention_layers: list[int] | None = None,
        linear_to_full_ratio: int | None = None,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_attention_heads if num_key_value_heads is None else num_key_value_heads
        self.head_dim = head_dim if head_dim is not None else _default_head_dim(hidden_size, num_attention_heads)
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.use_cache = use_cache
        self.rope_parameters = rope_parameters
        self.attention_bias = attention_bias
        self.attention_output_bias = attention_bias if attention_output_bias is None else attention_output_bias
        self.attention_dropout = attention_dropout
        self.mlp_bias = mlp_bias
        self.qk_norm = qk_norm
        self.sliding_window = sliding_window
        self.mlp_layer_types = list(mlp_layer_types) if mlp_layer_types is not None else ["dense"] * num_hidden_layers
        self.attn_output_gate = attn_output_gate
        self.attn_output_gate_bias = attn_output_gate_bias
        self.attn_output_gate_rank = attn_output_gate_rank
        self.attn_output_gate_activation = attn_output_gate_activation
        self.attn_output_gate_scale = attn_output_gate_scale
        self.attn_output_gate_init = attn_output_gate_init
        self.attn_output_gate_bias_init = attn_output_gate_bias_init
        self.attn_output_gate_lr_scale = attn_output_gate_lr_scale
        self.linear_attn_type = linear_attn_type
        self.linear_attn_gate = linear_attn_gate
        self.linear_attn_gate_low_rank_dim = linear_attn_gate_low_rank_dim
        self.linear_attn_gate_normalizer = linear_attn_gate_normalizer
        self.linear_attn_conv_size = linear_attn_conv_size
        self.linear_attn_qk_norm = linear_attn_qk_norm
        self.linear_attn_output_norm = linear_attn_output_norm
        self.linear_attn_use_rope = linear_attn_use_rope
        self.linear_attn_chunk_size = linear_attn_chunk_size
        self.linear_attn_hybrid = linear_attn_hybrid
        self.linear_attn_mix_weights = [float(w) for w in linear_attn_mix_weights]
        self.linear_attn_num_sinks = linear_attn_num_sinks
        self.layer_types = _resolve_layer_layout(self, layer_types, full_attention_layers, linear_to_full_ratio)
        # The shorthands are folded into layer_types, which is what gets saved.
        self.full_attention_layers = None
        self.linear_to_full_ratio = None
        # Ours first: transformers' own validators would report the same problems less specifically.
        self.validate_hf_arch()
        kwargs.setdefault("rope_theta", kwargs.pop("rope_theta", self.default_theta))
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )

    def validate_hf_arch(self) -> None:
        """Reject values out of range or inconsistent, naming the field."""
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{type(self).__name__}.{name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(
                f"{type(self).__name__}: num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads}) for grouped-query attention"
            )
        if not 0.0 <= float(self.attention_dropout) < 1.0:
            raise ValueError(f"{type(self).__name__}.attention_dropout must be in [0, 1), got {self.attention_dropout}")
        if self.rms_norm_eps <= 0:
            raise ValueError(f"{type(self).__name__}.rms_norm_eps must be > 0, got {self.rms_norm_eps}")
        _check_per_layer(self, "layer_types", SUPPORTED_LAYER_TYPES)
        _check_per_layer(self, "mlp_layer_types", SUPPORTED_MLP_LAYER_TYPES)
        if "sliding_attention" in self.layer_types and (self.sliding_window is None or self.sliding_window <= 0):
            raise ValueError(
                f"{type(self).__name__}: layer_types contains 'sliding_attention' but sliding_window is "
                f"{self.sliding_window!r}; set a positive window size"
            )
        self._validate_output_gate()
        if any(t in LINEAR_LAYER_TYPES for t in self.layer_types):
            self._validate_linear_attention()

    def _validate_output_gate(self) -> None:
        cls = type(self).__name__
        if self.attn_output_gate not in (None, *OUTPUT_GATE_GRANULARITIES):
            raise ValueError(
                f"{cls}.attn_output_gate must be None or one of {OUTPUT_GATE_GRANULARITIES}, got {self.attn_output_gate!r}"
            )
        if self.attn_output_gate_activation not in OUTPUT_GATE_ACTIVATIONS:
            raise ValueError(
                f"{cls}.attn_output_gate_activation must be one of {OUTPUT_GATE_ACTIVATIONS}, "
                f"got {self.attn_output_gate_activation!r}"
            )
        if self.attn_output_gate_init not in OUTPUT_GATE_INITS:
            raise ValueError(
                f"{cls}.attn_output_gate_init must be one of {OUTPUT_GATE_INITS}, got {self.attn_output_gate_init!r}"
            )
        rank = self.attn_output_gate_rank
        if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0):
            raise ValueError(f"{cls}.attn_output_gate_rank must be a positive integer or None, got {rank!r}")
        if not self.attn_output_gate_scale > 0:
            raise ValueError(f"{cls}.attn_output_gate_scale must be > 0, got {self.attn_output_gate_scale!r}")
        if not self.attn_output_gate_lr_scale > 0:
            raise ValueError(f"{cls}.attn_output_gate_lr_scale must be > 0, got {self.attn_output_gate_lr_scale!r}")


    def _validate_linear_attention(self) -> None:
        cls = type(self).__name__
        for field, allowed in (
            ("linear_attn_type", LINEAR_ATTN_TYPES),
            ("linear_attn_gate", LINEAR_ATTN_GATES),
            ("linear_attn_qk_norm", LINEAR_ATTN_QK_NORMS),
            ("linear_attn_output_norm", LINEAR_ATTN_OUTPUT_NORMS),
            ("linear_attn_hybrid", LINEAR_ATTN_HYBRIDS),
        ):
            if getattr(self, field) not in allowed:
                raise ValueError(f"{cls}.{field} must be one of {allowed}, got {getattr(self, field)!r}")
        for field, minimum in (("linear_attn_gate_low_rank_dim", 1), ("linear_attn_conv_size", 0),
                               ("linear_attn_chunk_size", 1), ("linear_attn_num_sinks", 0)):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                raise ValueError(f"{cls}.{field} must be an integer >= {minimum}, got {value!r}")
        if not self.linear_attn_gate_normalizer > 0:
            raise ValueError(f"{cls}.linear_attn_gate_normalizer must be > 0, got {self.linear_attn_gate_normalizer!r}")
        if len(self.linear_attn_mix_weights) != 2:
            raise ValueError(f"{cls}.linear_attn_mix_weights must be [w_linear, w_window], got {self.linear_attn_mix_weights}")
        hybrid = self.linear_attn_hybrid != "none"
        if hybrid and (self.sliding_window is None or self.sliding_window <= 0):
            raise ValueError(f"{cls}: linear_attn_hybrid={self.linear_attn_hybrid!r} needs a positive sliding_window "
                             f"(the window branch's size), got {self.sliding_window!r}")
        if "hybrid_sliding" in self.layer_types and not hybrid:
            raise ValueError(f"{cls}.layer_types has 'hybrid_sliding' layers but linear_attn_hybrid is 'none'")
        if self.linear_attn_num_sinks and self.linear_attn_hybrid != "lizard":
            raise ValueError(f"{cls}.linear_attn_num_sinks applies to linear_attn_hybrid='lizard' only, "
                             f"got {self.linear_attn_num_sinks} with {self.linear_attn_hybrid!r}")


def _resolve_layer_layout(config, layer_types, full_attention_layers, linear_to_full_ratio) -> list[str]:
    """``layer_types`` from the explicit list or a shorthand; linear layers become ``hybrid_sliding`` under a hybrid."""
    cls, n = type(config).__name__, config.num_hidden_layers
    if not isinstance(n, int) or n <= 0:
        raise ValueError(f"{cls}.num_hidden_layers must be a positive integer, got {n!r}")
    given = [name for name, value in (("layer_types", layer_types), ("full_attention_layers", full_attention_layers),
                                      ("linear_to_full_ratio", linear_to_full_ratio)) if value is not None]
    if len(given) > 1:
        raise ValueError(f"{cls}: give only one of layer_types, full_attention_layers, linear_to_full_ratio; got {given}")
    default = getattr(config, "default_layer_type", "full_attention")
    if full_attention_layers is not None:
        bad = [i for i in full_attention_layers if not isinstance(i, int) or isinstance(i, bool) or not -n <= i < n]
        if bad:
            raise ValueError(f"{cls}.full_attention_layers names layers {bad} that do not exist "
                             f"(num_hidden_layers = {n}, valid indices 0..{n - 1})")
        chosen = {i % n for i in full_attention_layers}
        layer_types = ["full_attention" if i in chosen else "linear_attention" for i in range(n)]
    elif linear_to_full_ratio is not None:
        r = linear_to_full_ratio
        if not isinstance(r, int) or isinstance(r, bool) or r < 1:
            raise ValueError(f"{cls}.linear_to_full_ratio must be an integer >= 1 (linear layers per full layer), got {r!r}")
        # Qwen3-Next's pattern: r linear layers, then one full-attention layer, repeated.
        layer_types = ["full_attention" if (i + 1) % (r + 1) == 0 else "linear_attention" for i in range(n)]
    elif layer_types is None:
        layer_types = [default] * n
    layer_types = list(layer_types)
    if getattr(config, "linear_attn_hybrid", "none") in ("liger", "lizard"):
        layer_types = ["hybrid_sliding" if t == "linear_attention" else t for t in layer_types]
    return layer_types


def _default_head_dim(hidden_size: int, num_attention_heads: int) -> int:
    if not isinstance(num_attention_heads, int) or num_attention_heads <= 0:
        raise ValueError(f"num_attention_heads must be a positive integer, got {num_attention_heads!r}")
    if hidden_size % num_attention_heads != 0:
        raise ValueError(
            f"hidden_size ({hidden_size}) is not divisible by num_attention_heads ({num_attention_heads}); "
            "pass head_dim explicitly if the heads are not meant to tile the hidden size"
        )
    return hidden_size // num_attention_heads


def _check_per_layer(config: HfArchConfig, field: str, allowed: tuple[str, ...]) -> None:
    values = getattr(config, field)
    if len(values) != config.num_hidden_layers:
        raise ValueError(
            f"{type(config).__name__}.{field} has {len(values)} entries but num_hidden_layers is "
            f"{config.num_hidden_layers}"
        )
    unknown = sorted({v for v in values if v not in allowed})
    if unknown:
        raise ValueError(f"{type(config).__name__}.{field} has unsupported entries {unknown}; supported: {allowed}")
