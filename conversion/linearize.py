"""Linearization: a Llama-family model → a linear-attention (GLA / Gated DeltaNet) model with every source weight copied.

Each linear layer keeps the softmax layer's ``q/k/v/o_proj`` (and q/k norms) key for key; a method preset chooses
what is added on top (``LinearizeOptions.method``):

* ``liger`` (Lan et al., Liger, arXiv 2503.01496) → ``hfa_gla``: the forget gate is pooled from the key itself
  (``logsigmoid(k) / τ``), q/k go through a softmax over the head dim, and the layer mixes ``0.5·GLA + 0.5·SWA``
  with the same q/k/v. No new parameters at all: the converted model is usable before any training.
* ``lolcats`` (Zhang et al., LoLCATs, arXiv 2410.10254) → ``hfa_gla``: no decay, learnable Hedgehog feature maps
  (identity at init) and LoLCATs' hybrid (``linear_attn_hybrid="lolcats"``): the last ``window`` keys by softmax
  ``γ·exp(q·k/√d - max)`` and every older key by ``φ(q)·φ(k)``, over ONE shared denominator, γ = sigmoid(·) per head,
  learnable, initialised to 0.5 (LoLCATs starts at 0.1: 1.0094x against 1.0054x after 10 CPU-minutes on stories260K,
  52x against 14x SmolLM2's perplexity before training). Exact softmax attention while the window holds every key.
  (Checkpoints converted before this kept loading as the ``lizard``-style sum they were built with.)
* ``lizard`` (Van Nguyen et al., Lizard, arXiv 2507.09025) → ``hfa_gla``: a per-head scalar gate σ(W_γ x) (new
  parameters), GLA + α·(sliding window with ``num_sinks`` learnable sink logits, zero at init), α learnable and
  initialised to 1. Lizard also learns a feature map on q/k; we keep the identity map here.
* ``still`` (STILL, "Selecting Tokens for Intra-Layer Hybrid Attention to Linearize LLMs") → ``hfa_gla``: LoLCATs'
  hybrid and shared denominator, with STILL's NP-Map features (Hedgehog's learnable directions, identity at init,
  the source's q / k norms) and token selection: beyond the window, the ``selection_topk`` most self-salient
  tokens of every ``selection_block`` positions stay softmax keys (kept in the cache), the rest enter the linear
  state. Exact softmax attention while the window holds every key. GLA only (the shared denominator needs the
  normalised branch).
* ``mamba_init`` (Wang et al., The Mamba in the Llama, arXiv 2408.15237) → ``hfa_gated_deltanet``: attention's
  q→C, k→B, v→x, o→out is exactly our q/k/v/o key mapping; the decay, β, short conv (width 4) and gated RMSNorm
  output are new with their standard initialisation, q/k are L2-normalised.

Layers listed in ``keep_full_attention`` (or every ``(ratio + 1)``-th layer) keep the source's attention exactly
(type, window and attention implementation). ``attention_mse_per_layer`` measures how far each linear layer is from
its softmax teacher (the stage-1 attention-transfer objective of LoLCATs), e.g. before and after that stage.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..configuration import LINEAR_ATTN_FEATURE_MAPS, LINEAR_LAYER_TYPES
from ..layers.norm import HfArchRMSNorm
from ..models.gated_deltanet import GatedDeltaNetConfig, GatedDeltaNetForCausalLM
from ..models.gla import GLAConfig, GLAForCausalLM
from ..peft_utils import new_parameter_names
from .sources import adapter_for, takes_source_families
from .weights import build_from_source

__all__ = ["LINEARIZE_METHODS", "LINEAR_TARGETS", "LinearTarget", "LinearizeOptions", "attention_mse_per_layer",
           "linearize", "linearize_to", "linearized_config_from", "register_linear_target"]

LINEARIZE_METHODS = ("liger", "lolcats", "lizard", "still", "mamba_init")


@dataclass
class LinearizeOptions:
    method: str = "liger"  # liger | lolcats | lizard | still | mamba_init
    keep_full_attention: list[int] | None = None  # source layers that keep their softmax attention
    ratio: int | None = None  # every (ratio + 1)-th layer keeps full attention
    # Sliding-window branch of the intra-layer hybrids (liger, lolcats, lizard): 128 recovered best on stories260K
    # (recipes/results/stories260k_recipe_ablation.md: 1.049x at 128, 1.069x at 64, 1.103x at 32 for LoLCATs).
    window: int = 128
    num_sinks: int = 4  # lizard's learnable sink logits
    # still: blocks of positions (default min(64, window)) and the tokens of each kept as softmax keys beyond the
    # window (default an eighth of the block, at least 1)
    selection_block: int | None = None
    selection_topk: int | None = None
    gate_normalizer: float = 16.0  # τ of the GLA-style log gate
    # Overrides of the method preset (recipe fields; None keeps the preset's): the linear branch's feature map
    # (identity | softmax | hedgehog | norm_aware | np_map) and the hybrids' initial [w_linear, w_window] mixing weights (lizard adds
    # α·window to the linear branch, w_window is α's init and w_linear must be 1; lolcats: w_window is γ's init).
    feature_map: str | None = None
    mix_weights: list[float] | None = None

    def as_dict(self) -> dict:
        return asdict(self)

    def validate(self, num_layers: int | None = None) -> None:
        if self.method not in LINEARIZE_METHODS:
            raise ValueError(f"Unknown linearization method {self.method!r}; valid methods: {', '.join(LINEARIZE_METHODS)}")
        if self.keep_full_attention is not None and self.ratio is not None:
            raise ValueError("Give only one of keep_full_attention and ratio "
                             f"(got keep_full_attention={self.keep_full_attention}, ratio={self.ratio})")
        if self.ratio is not None and (not isinstance(self.ratio, int) or isinstance(self.ratio, bool) or self.ratio < 1):
            raise ValueError(f"ratio must be an integer >= 1 (linear layers per full-attention layer), got {self.ratio!r}")
        if not isinstance(self.window, int) or isinstance(self.window, bool) or self.window <= 0:
            raise ValueError(f"window must be a positive integer, got {self.window!r}")
        if not isinstance(self.num_sinks, int) or isinstance(self.num_sinks, bool) or self.num_sinks < 0:
            raise ValueError(f"num_sinks must be an integer >= 0, got {self.num_sinks!r}")
        if self.method == "still":
            block, topk = self.selection()
            if not (isinstance(block, int) and 1 <= block <= self.window and isinstance(topk, int)
                    and 0 <= topk <= block):
                raise ValueError(f"still: selection_block must be in [1, window={self.window}] and selection_topk in "
                                 f"[0, selection_block], got {block} / {topk}")

        if self.feature_map is not None and self.feature_map not in LINEAR_ATTN_FEATURE_MAPS:
            raise ValueError(f"feature_map must be one of {LINEAR_ATTN_FEATURE_MAPS}, got {self.feature_map!r}")
        if self.mix_weights is not None and (
                len(self.mix_weights) != 2 or not all(isinstance(w, (int, float)) for w in self.mix_weights)):
            raise ValueError(f"mix_weights must be two numbers [w_linear, w_window], got {self.mix_weights!r}")
        if not self.gate_normalizer > 0:
            raise ValueError(f"gate_normalizer must be > 0, got {self.gate_normalizer!r}")
        if self.keep_full_attention is not None and num_layers is not None:
            for i in self.keep_full_attention:
                if not isinstance(i, int) or isinstance(i, bool) or not -num_layers <= i < num_layers:
                    raise ValueError(f"keep_full_attention index {i!r} is out of range for a source with "
                                     f"{num_layers} layers (valid indices 0..{num_layers - 1})")

    def selection(self) -> tuple[int, int]:
        """STILL's (block, topk) with the defaults resolved."""
        block = self.selection_block if self.selection_block is not None else min(64, self.window)
        topk = self.selection_topk if self.selection_topk is not None else max(1, block // 8)
        return block, topk

    def kept_layers(self, num_layers: int) -> set[int]:
        """Indices of the layers that keep softmax attention."""
        self.validate(num_layers)
        if self.keep_full_attention is not None:
            return {i % num_layers for i in self.keep_full_attention}
        if self.ratio is not None:
            return {i for i in range(num_layers) if (i + 1) % (self.ratio + 1) == 0}
        return set()

    def target(self, to: str | None = None) -> str:
        """The linear target this method converts to: ``to`` if given (it must offer the method), else the first
        registered target that offers it (liger / lolcats / lizard / still → gla, mamba_init → gated_deltanet)."""
        self.validate()
        if to is not None:
            if to not in LINEAR_TARGETS or self.method not in LINEAR_TARGETS[to].methods:
                offered = sorted(LINEAR_TARGETS[to].methods) if to in LINEAR_TARGETS else []
                raise ValueError(f"linearization target {to!r} offers methods {offered}, not {self.method!r}")
            return to
        return next(name for name, target in LINEAR_TARGETS.items() if self.method in target.methods)


@dataclass(frozen=True)
class LinearTarget:
    """A variant linearization can produce: its config / model classes and, per method, the config fields the method
    sets (a function of the options). Kept layers stay softmax attention; the others are the config's linear layers
    (``layer_types`` "linear_attention", whichever token mixer the config builds there)."""

    config_class: type
    model_class: type
    methods: dict


LINEAR_TARGETS: dict[str, LinearTarget] = {}


def register_linear_target(to: str, config_class: type, model_class: type, methods: dict) -> LinearTarget:
    """Make ``LinearizeOptions(method=m)`` with ``linearize(..., to=to)`` build ``config_class`` with the fields
    ``methods[m](options)`` returns (methods must be among ``LINEARIZE_METHODS``)."""
    unknown = sorted(set(methods) - set(LINEARIZE_METHODS))
    if unknown:
        raise ValueError(f"register_linear_target({to!r}): unknown methods {unknown}; known: {LINEARIZE_METHODS}")
    LINEAR_TARGETS[to] = LinearTarget(config_class, model_class, dict(methods))
    return LINEAR_TARGETS[to]


def _common(options: LinearizeOptions) -> dict:
    return dict(linear_attn_gate_normalizer=float(options.gate_normalizer), linear_attn_use_rope=False)


register_linear_target("gla", GLAConfig, GLAForCausalLM, {
    "liger": lambda o: dict(_common(o), linear_attn_gate="key_pooled", linear_attn_feature_map="softmax",
                            linear_attn_hybrid="liger", linear_attn_mix_weights=[0.5, 0.5],
                            linear_attn_output_norm="none", linear_attn_conv_size=0, linear_attn_qk_norm="none"),
    "lolcats": lambda o: dict(_common(o), linear_attn_gate="none", linear_attn_feature_map="hedgehog",
                              linear_attn_normalize=True, linear_attn_hybrid="lolcats",
                              linear_attn_mix_weights=[1.0, 0.5], linear_attn_output_norm="none",
                              linear_attn_conv_size=0, linear_attn_qk_norm="none"),
    "still": lambda o: dict(_common(o), linear_attn_gate="none", linear_attn_feature_map="np_map",
                            linear_attn_normalize=True, linear_attn_hybrid="still",
                            linear_attn_selection_block=o.selection()[0], linear_attn_selection_topk=o.selection()[1],
                            linear_attn_mix_weights=[1.0, 0.5], linear_attn_output_norm="none",
                            linear_attn_conv_size=0, linear_attn_qk_norm="none"),
    # Lizard: Hedgehog feature maps (as LoLCATs; an identity map makes the unnormalised linear branch explode:
    # 87K perplexity before training on stories260K), a scalar gate σ(W_γ x), learnable sink logits.
    "lizard": lambda o: dict(_common(o), linear_attn_gate="scalar", linear_attn_feature_map="hedgehog",
                             linear_attn_normalize=True, linear_attn_hybrid="lizard", linear_attn_num_sinks=o.num_sinks,
                             linear_attn_mix_weights=[1.0, 1.0], linear_attn_output_norm="none",
                             linear_attn_conv_size=0, linear_attn_qk_norm="none"),
})
register_linear_target("gated_deltanet", GatedDeltaNetConfig, GatedDeltaNetForCausalLM, {
    "mamba_init": lambda o: dict(_common(o), linear_attn_gate="low_rank", linear_attn_feature_map="identity",
                                 linear_attn_hybrid="none", linear_attn_conv_size=4, linear_attn_qk_norm="l2",
                                 linear_attn_output_norm="gated_rmsnorm"),
})


def linearized_config_from(source_config, options: LinearizeOptions, to: str | None = None):
    """The target config: the source's fields (``adapter_for(...).backbone_kwargs``) plus the method preset of the
    linear target (``LinearizeOptions.target``)."""
    kwargs = adapter_for(source_config).backbone_kwargs(source_config)
    n = kwargs["num_hidden_layers"]
    kept = options.kept_layers(n)
    target = LINEAR_TARGETS[options.target(to)]
    config_class, overrides = target.config_class, target.methods[options.method](options)
    if options.feature_map is not None:
        overrides["linear_attn_feature_map"] = options.feature_map
    if options.mix_weights is not None:
        if overrides.get("linear_attn_hybrid", "none") == "none":
            raise ValueError(f"mix_weights: method {options.method!r} has no window branch to mix with")
        if overrides["linear_attn_hybrid"] == "lizard" and options.mix_weights[0] != 1:
            raise ValueError(f"mix_weights: method {options.method!r} adds α·window to the linear branch (weight 1); "
                             f"only w_window (α's init) can change, got w_linear={options.mix_weights[0]}")
        overrides["linear_attn_mix_weights"] = [float(w) for w in options.mix_weights]
    source_types = list(kwargs.pop("layer_types", None) or ["full_attention"] * n)
    source_window = kwargs.pop("sliding_window", None)
    layer_types = [source_types[i] if i in kept else "linear_attention" for i in range(n)]
    if "linear_attention" not in layer_types:
        # Every layer kept: the method's linear-layer options would configure no layer (the config refuses them).
        overrides = {}
    hybrid = overrides.get("linear_attn_hybrid", "none") != "none"
    window = options.window if hybrid else None
    if any(layer_types[i] == "sliding_attention" for i in kept):
        # One sliding_window field serves both the kept sliding layers and the hybrid's window branch.
        if hybrid and source_window != options.window:
            raise ValueError(
                f"Kept layers {sorted(i for i in kept if layer_types[i] == 'sliding_attention')} use the source's "
                f"sliding window ({source_window}) but the {options.method!r} window branch asks for "
                f"window={options.window}; the config has one sliding_window, so pass window={source_window}"
            )
        window = source_window
    return config_class(**kwargs, **overrides, layer_types=layer_types, sliding_window=window)


class _TorchInit:
    """The ``init`` namespace that ``init_parameters`` methods expect, writing unconditionally (plain torch)."""

    copy_ = staticmethod(lambda tensor, other: tensor.copy_(other))
    uniform_ = staticmethod(nn.init.uniform_)
    constant_ = staticmethod(nn.init.constant_)
    zeros_ = staticmethod(nn.init.zeros_)
    ones_ = staticmethod(nn.init.ones_)
    normal_ = staticmethod(nn.init.normal_)


@torch.no_grad()
def _init_new_parameters(target, added: set[str]) -> None:
    """Initialise every parameter the linearization adds (and nothing else), explicitly."""
    std = target.config.initializer_range
    done: set[str] = set()
    for module_name, module in target.named_modules():
        prefix = f"{module_name}." if module_name else ""
        own = {f"{prefix}{n}" for n, _ in module.named_parameters(recurse=False)} & added
        if not own:
            continue
        if isinstance(module, nn.Linear):  # gate / decay / β / output-gate projections
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, HfArchRMSNorm):
            nn.init.ones_(module.weight)
        elif callable(getattr(module, "init_parameters", None)):
            module.init_parameters(_TorchInit)  # the mixer's own: A_log, dt_bias, α, sinks, feature maps, conv taps
        else:
            raise TypeError(f"No initialisation for new parameters {sorted(own)} of {type(module).__name__}")
        done |= own
    missing = sorted(added - done)
    if missing:
        raise RuntimeError(f"New parameters left uninitialised: {missing}")


@torch.no_grad()
@takes_source_families
def linearize(source_model, options: LinearizeOptions | None = None, to: str | None = None):
    """Build the linearized model from an in-memory source model (same dtype), copying and checking every weight
    (``to``: the linear target, when more than one offers the method)."""
    options = options or LinearizeOptions()
    config = linearized_config_from(source_model.config, options, to)
    model_class = LINEAR_TARGETS[options.target(to)].model_class
    return build_from_source(source_model, config, model_class,
                             lambda target: _init_new_parameters(target, set(new_parameter_names(target))),
                             sides=("source (teacher)", "linearized (student)"))


def linearize_to(to: str):
    """``linearize`` for one linear target, as a conversion function ``(source_model, options) -> model``."""

    def convert(source_model, options: LinearizeOptions | None = None):
        return linearize(source_model, options, to=to)

    convert.__name__ = f"linearize_to_{to}"
    return convert


def linear_attention_layers(model) -> list[nn.Module]:
    """The token mixers of the model's linear layers (GLA, Gated DeltaNet, KDA, …), in layer order."""
    from ..models.backbone import HfArchDecoderLayer

    return [m.self_attn for m in model.modules()  # any wrapper (PEFT, DDP) around the model
            if isinstance(m, HfArchDecoderLayer) and m.layer_type in LINEAR_LAYER_TYPES]


@torch.no_grad()
def attention_mse_per_layer(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> list[float]:
    """Per linear layer (in layer order): MSE between its output and its softmax teacher's, over real tokens.

    Runs the model once with ``attention_transfer=True`` (each layer sees the teacher's residual stream, as in
    LoLCATs' stage 1) and reads the output's ``transfer_losses``."""
    linear = len(linear_attention_layers(model))
    outputs = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, attention_transfer=True)
    losses = outputs.transfer_losses or ()
    if len(losses) != linear:
        raise RuntimeError(f"Expected one transfer loss per linear layer ({linear}), got {len(losses)}")
    return [float(loss) for loss in losses]
