"""MoE refactorization: a Llama-family model's dense SwiGLU FFNs → ``hfa_moe`` experts.

The methods, each copying every non-FFN weight unchanged:

- ``partition`` (LLaMA-MoE, MoEfication, Read-ME): the FFN's ``I`` neurons are split into ``E`` experts of ``I/E``
  neurons each (a SwiGLU is a sum over its neurons, so the experts together compute the dense FFN exactly). Splits:
  ``activation`` (the default: balanced k-means of which calibration tokens activate each neuron, so neurons that
  fire together share an expert), ``cluster`` (balanced k-means of the neurons' gate rows) or ``random``. By default
  about one expert's width of the most active neurons forms an always-on shared expert (``shared_neurons``; Read-ME
  / LLaMA-MoE v2). Routers start at the experts' centroids (the mean gate row of their neurons) and are then fitted
  to the experts that carry the dense output on the calibration text (``moe_router_distill``). The default router,
  ``tempered_topk``, weighs the chosen experts by ``softmax(τ·logits)`` with ``τ = 0`` at first: equal weights,
  scaled by ``routed_scale`` (default ``k``: the chosen experts' plain sum, i.e. the dense sum with the other
  experts' terms dropped; LLaMA-MoE uses ``E/k``), so every expert active is the dense FFN whatever the router rows.
- ``read_me`` (Read-ME): the same partition, routed by one pre-gate decoupled from the layers (``moe_router=
  'pre_gated'``, ``model.pre_gate`` on the token embeddings), fitted on the calibration text to every layer's
  targets at once (``read_me.distill_pre_gate``); exact with every expert active, as a partition.
- ``upcycle`` (sparse upcycling): every expert is a copy of the dense FFN and a router is added; with renormalised
  weights the output equals the dense FFN exactly until training makes the experts differ.
- ``native``: the source is already an MoE (Qwen3-MoE, Mixtral, Qwen2-MoE); imported as it is (``moe_import.py``).

MoE++ zero / copy experts can be added to either (their router rows start at zero). ``pool=True`` (UniPool) puts
every layer's experts into one global pool of ``L·E`` experts that every layer's router can reach; a router bias
keeps each layer on its own experts at first: ``-pool_foreign_bias`` on the others' (default: a bound on the
largest router logit, so the pooled model routes exactly as the per-layer one until training moves the biases; a
smaller value lets training discover the other layers' experts sooner, at the price of an inexact start).

Exact cases, tested: upcycling, a partition with every expert active (``top_k = E``, default scale and router, with
or without router distillation), and the pooled form of either; all equal the source within float rounding.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace

import torch
import torch.nn.functional as F

from ..models.moe import MoEConfig, MoEForCausalLM
from .moe_import import NATIVE_MOE_TYPES, moe_from_native
from .moe_router_distill import distill_routers, layer_ffn_inputs
from .read_me import distill_pre_gate
from .sources import adapter_for, takes_source_families
from .weights import build_from_source

METHODS = ("partition", "upcycle", "native", "read_me")  # native: an MoE source imported as it is (moe_import.py)
# The dense FFN's tensors, which the conversion maps itself (into experts and the shared expert).
DENSE_FFN = r"\.mlp\.(shared_expert\.)?(gate_proj|up_proj|down_proj)\."
SPLITS = ("random", "cluster", "activation")
ROUTER_INITS = ("centroid", "zero")
ROUTERS = ("tempered_topk", "softmax_topk")
# Calibration tokens a partition needs per expert (activation statistics and router targets from fewer are noise).
MIN_CALIBRATION_TOKENS_PER_EXPERT = 64


@dataclass
class MoERefactorOptions:
    method: str = "partition"
    experts: int = 8
    top_k: int = 2
    split: str = "activation"  # partition only: needs calibration text (cluster / random do not)
    # partition only: the most active neurons become an always-on shared expert; None: about one expert's width
    # (``auto_shared_neurons``), 0: none
    shared_neurons: int | None = None
    router: str | None = None  # None: tempered_topk for a partition (exact with every expert active), softmax_topk
    router_distill_steps: int = 200  # partition: fit the routers to calibration targets (0: keep the init)
    pre_gate_hidden: int = 256  # read_me: width of the pre-gate MLP
    pre_gate_steps: int = 300  # read_me: steps fitting the pre-gate to the layers' calibration targets
    zero_experts: int = 0
    copy_experts: int = 0
    router_init: str = "centroid"  # centroid: each expert's mean gate row (for copies: all equal) | zero: uniform
    router_std: float = 0.0  # upcycle: random router init with this std instead
    routed_scale: float | None = None  # multiplies the renormalised top-k weights; None: top_k (partition), 1 (upcycle)
    pool: bool = False  # UniPool: one global pool holding every layer's experts
    pool_foreign_bias: float | None = None  # router bias against other layers' experts; None: exact (see above)
    calibration_tokens: int = 4096  # activation split / shared neurons: tokens of calibration text to run
    seed: int = 0

    def resolve(self, intermediate_size: int) -> "MoERefactorOptions":
        """The options with their automatic defaults filled in for a source FFN of ``intermediate_size``."""
        partition = self.partitions
        shared = self.shared_neurons
        if shared is None:
            shared = auto_shared_neurons(intermediate_size, self.experts) if partition else 0
        router = self.router or ("pre_gated" if self.method == "read_me" else
                                 "tempered_topk" if partition else "softmax_topk")
        return replace(self, shared_neurons=shared, router=router)

    def validate(self, intermediate_size: int) -> None:
        if self.shared_neurons is None or self.router is None:
            self = self.resolve(intermediate_size)
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.router_init not in ROUTER_INITS:
            raise ValueError(f"router_init must be one of {ROUTER_INITS}, got {self.router_init!r}")
        if self.split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {self.split!r}")
        if self.method == "read_me":
            if self.router != "pre_gated":
                raise ValueError(f"method='read_me' routes with the pre-gate (router 'pre_gated'), not {self.router!r}")
        elif self.router not in ROUTERS:
            raise ValueError(f"router must be one of {ROUTERS}, got {self.router!r}")
        for name, minimum in (("experts", 1), ("top_k", 1), ("shared_neurons", 0), ("zero_experts", 0),
                              ("copy_experts", 0), ("calibration_tokens", 1), ("router_distill_steps", 0),
                              ("pre_gate_hidden", 1), ("pre_gate_steps", 0)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
        for name in ("routed_scale", "pool_foreign_bias"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0 (or None for the default), got {value!r}")
        routed = self.experts + self.zero_experts + self.copy_experts
        if self.top_k > routed:
            raise ValueError(f"top_k ({self.top_k}) is larger than the routed experts ({routed})")
        if self.method == "read_me" and self.pool:
            raise ValueError("method='read_me' plans each layer's own experts; pool (UniPool) does not apply")
        if self.partitions:
            neurons = intermediate_size - self.shared_neurons
            if self.shared_neurons >= intermediate_size:
                raise ValueError(f"shared_neurons ({self.shared_neurons}) must be smaller than the source FFN's "
                                 f"intermediate_size ({intermediate_size})")
            if self.experts > neurons:
                raise ValueError(f"experts ({self.experts}) is more than the FFN neurons to split "
                                 f"({neurons} = intermediate_size {intermediate_size} - shared {self.shared_neurons})")
            if neurons % self.experts:
                raise ValueError(f"the {neurons} FFN neurons to split (intermediate_size {intermediate_size} - shared "
                                 f"{self.shared_neurons}) do not divide into {self.experts} equal experts")
        elif self.shared_neurons:
            raise ValueError("shared_neurons applies to method='partition' or 'read_me' only")

    @property
    def partitions(self) -> bool:
        """The dense FFN's neurons are split into the experts (partition, read_me)."""
        return self.method in ("partition", "read_me")

    @property
    def needs_calibration(self) -> bool:
        if self.method == "read_me":
            return True  # the pre-gate's targets come from the calibration text
        return self.method == "partition" and (self.split == "activation" or self.shared_neurons != 0
                                               or self.router_distill_steps > 0)

    def as_dict(self) -> dict:
        return asdict(self)


def auto_shared_neurons(intermediate_size: int, experts: int) -> int:
    """About one expert's width (``I / (E + 1)``, rounded up), grown until the rest splits into ``E`` equal experts."""
    shared = -(-intermediate_size // (experts + 1))
    while shared < intermediate_size and (intermediate_size - shared) % experts:
        shared += 1
    return shared if shared < intermediate_size else 0  # none fits: validation names the experts problem


def moe_config_from(source_config, options: MoERefactorOptions) -> MoEConfig:
    kwargs = adapter_for(source_config).backbone_kwargs(source_config)
    if kwargs.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act={kwargs['hidden_act']!r}: the MoE experts are SwiGLU (silu) MLPs, so a "
                         f"{source_config.model_type} FFN cannot become experts exactly")
    I = source_config.intermediate_size
    options = options.resolve(I)
    options.validate(I)
    partition = options.partitions
    expert_width = (I - options.shared_neurons) // options.experts if partition else I
    default_scale = float(options.top_k) if partition else 1.0
    pool = {}
    if options.pool:
        pool = dict(moe_expert_pool="global", moe_pool_size=options.experts * source_config.num_hidden_layers,
                    moe_router_bias=True)
    return MoEConfig(
        **kwargs,
        mlp_layer_types=["sparse"] * source_config.num_hidden_layers,
        num_experts=options.experts,
        num_experts_per_tok=options.top_k,
        moe_intermediate_size=expert_width,
        num_shared_experts=1 if options.shared_neurons else 0,
        shared_expert_intermediate_size=options.shared_neurons or None,
        moe_router=options.router,
        **({"moe_norm_topk_prob": True} if options.router == "softmax_topk" else {}),
        moe_routed_scale=default_scale if options.routed_scale is None else float(options.routed_scale),
        moe_zero_experts=options.zero_experts,
        moe_copy_experts=options.copy_experts,
        **({"moe_pre_gate_hidden": options.pre_gate_hidden} if options.method == "read_me" else {}),
        **pool,
    )


# -- neuron statistics and splits --------------------------------------------------------------------------------

@torch.no_grad()
def neuron_activations(source_model, input_ids: torch.Tensor, attention_mask=None,
                       inputs: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """Per layer, ``|silu(gate) · up|`` of every FFN neuron on every real calibration token: ``[tokens, I]``
    (``inputs``: the layers' FFN inputs if already captured, ``layer_ffn_inputs``)."""
    inputs = inputs if inputs is not None else layer_ffn_inputs(source_model, input_ids, attention_mask)
    activations = []
    for layer, x in zip(source_model.model.layers, inputs):
        mlp = layer.mlp
        x = x.to(mlp.gate_proj.weight.dtype)
        activations.append((F.silu(mlp.gate_proj(x)) * mlp.up_proj(x)).abs().float())
    return activations


def balanced_kmeans(features: torch.Tensor, clusters: int, seed: int = 0, iterations: int = 15) -> torch.Tensor:
    """Assign ``features [n, d]`` rows to ``clusters`` groups of exactly ``n / clusters`` rows (cosine k-means,
    then a balanced assignment by affinity). Returns ``[n]`` group ids."""
    n = features.shape[0]
    size = n // clusters
    x = F.normalize(features.float(), dim=-1)
    generator = torch.Generator().manual_seed(seed)
    centroids = x[torch.randperm(n, generator=generator)[:clusters]].clone()
    assignment = torch.zeros(n, dtype=torch.long)
    for _ in range(iterations):
        affinity = x @ centroids.T  # [n, clusters]
        assignment = _balanced_assign(affinity, size)
        for c in range(clusters):
            members = x[assignment == c]
            centroids[c] = F.normalize(members.mean(0), dim=0) if members.numel() else centroids[c]
    return assignment


def _balanced_assign(affinity: torch.Tensor, size: int) -> torch.Tensor:
    """Balanced assignment in proposal rounds: every unplaced row proposes to its best cluster that still has room;
    each cluster accepts its highest-affinity proposers up to its room. Vectorised; at most ``clusters`` rounds
    place every row because a full cluster is never proposed to again."""
    n, clusters = affinity.shape
    assignment = torch.full((n,), -1, dtype=torch.long)
    room = torch.full((clusters,), size, dtype=torch.long)
    while (assignment < 0).any():
        open_rows = (assignment < 0).nonzero().squeeze(1)
        scores = affinity[open_rows].masked_fill(room.eq(0).unsqueeze(0), float("-inf"))
        choice = scores.argmax(dim=1)
        best = scores.gather(1, choice.unsqueeze(1)).squeeze(1)
        # Rank proposers within each cluster by affinity (sort by cluster, then by descending affinity).
        order = torch.argsort(best, descending=True, stable=True)
        order = order[torch.argsort(choice[order], stable=True)]
        sorted_choice = choice[order]
        first_of_cluster = torch.searchsorted(sorted_choice, torch.arange(clusters))
        rank = torch.arange(order.numel()) - first_of_cluster[sorted_choice]
        accepted = order[rank < room[sorted_choice]]
        assignment[open_rows[accepted]] = choice[accepted]
        room -= torch.bincount(choice[accepted], minlength=clusters)
    return assignment


def split_neurons(gate_weight: torch.Tensor, options: MoERefactorOptions, activations: torch.Tensor | None,
                  layer_seed: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``(shared neuron ids, [ids of expert e] * E)`` for one layer's FFN."""
    I = gate_weight.shape[0]
    neurons = torch.arange(I)
    shared = torch.empty(0, dtype=torch.long)
    if options.shared_neurons:
        frequency = (activations > activations.mean(0, keepdim=True)).float().mean(0)  # how often each neuron fires
        shared = frequency.argsort(descending=True)[: options.shared_neurons].sort().values
        neurons = neurons[~torch.isin(neurons, shared)]
    generator = torch.Generator().manual_seed(options.seed + layer_seed)
    if options.split == "random":
        perm = neurons[torch.randperm(neurons.numel(), generator=generator)]
        groups = list(perm.view(options.experts, -1))
    else:
        features = gate_weight[neurons] if options.split == "cluster" else activations[:, neurons].T
        ids = balanced_kmeans(features, options.experts, seed=options.seed + layer_seed)
        groups = [neurons[ids == e] for e in range(options.experts)]
    return shared, [g.sort().values for g in groups]


# -- the conversion ----------------------------------------------------------------------------------------------

@torch.no_grad()
@takes_source_families(takes_moe=True)
def refactor_moe(source_model, options: MoERefactorOptions | None = None, calibration_ids: torch.Tensor | None = None,
                 calibration_mask: torch.Tensor | None = None) -> MoEForCausalLM:
    """Build the MoE model from an in-memory Llama-family source (same dtype), copying every non-FFN weight; or,
    with ``method="native"``, import a native MoE source exactly (:func:`.moe_import.moe_from_native`)."""
    options = options or MoERefactorOptions()
    native_source = source_model.config.model_type in NATIVE_MOE_TYPES
    if native_source or options.method == "native":
        return _import_native(source_model, options)
    options = (options or MoERefactorOptions()).resolve(source_model.config.intermediate_size)
    config = moe_config_from(source_model.config, options)
    if options.needs_calibration:
        if calibration_ids is None:
            raise ValueError(f"split={options.split!r} / shared_neurons={options.shared_neurons} / "
                             f"router_distill_steps={options.router_distill_steps} need calibration tokens "
                             "(calibration_ids; `hf-arch convert` reads them from --calibration-file)")
        needed = MIN_CALIBRATION_TOKENS_PER_EXPERT * options.experts
        given = int(calibration_mask.sum()) if calibration_mask is not None else calibration_ids.numel()
        if given < needed:
            raise ValueError(f"the calibration text gives {given} tokens; {options.experts} experts need at least "
                             f"{needed} ({MIN_CALIBRATION_TOKENS_PER_EXPERT} per expert): give a longer "
                             "--calibration-file or raise --calibration-tokens")
    activations = inputs = None
    if options.needs_calibration:
        inputs = layer_ffn_inputs(source_model, calibration_ids, calibration_mask)
        activations = neuron_activations(source_model, calibration_ids, calibration_mask, inputs=inputs)
    target = build_from_source(source_model, config, MoEForCausalLM,
                               lambda target: _fill_experts(source_model, target, options, activations),
                               replaced=DENSE_FFN)
    report = {"resolved_options": options.as_dict()}
    if options.method == "read_me":
        report["pre_gate_distillation"] = distill_pre_gate(source_model, target, calibration_ids, calibration_mask,
                                                           steps=options.pre_gate_steps, inputs=inputs)
    elif options.method == "partition" and options.router_distill_steps:
        first = (lambda index: index * options.experts) if options.pool else None
        report["router_distillation"] = distill_routers(source_model, target, calibration_ids, calibration_mask,
                                                        steps=options.router_distill_steps, first_expert=first,
                                                        inputs=inputs)
    target.conversion_report = report  # read (and removed) by conversion.api into the conversion record
    return target


def _import_native(source_model, options: MoERefactorOptions) -> MoEForCausalLM:
    """``method="native"``: the experts, router and shared expert are the source's; the options that would shape
    new ones must stay at their defaults (each named otherwise)."""
    model_type = source_model.config.model_type
    if options.method != "native":
        raise ValueError(f"a {model_type} source is already a Mixture of Experts: convert it with method='native' "
                         f"(--method native), not {options.method!r}")
    defaults = MoERefactorOptions()
    reshaping = ("router", "zero_experts", "copy_experts", "pool")
    changed = [f.name for f in fields(MoERefactorOptions)
               if f.name not in ("method", "seed", "calibration_tokens", *reshaping)
               and getattr(options, f.name) != getattr(defaults, f.name)]
    if changed:
        raise ValueError(f"method='native' keeps the source's experts and router (reshaped only by "
                         f"{', '.join(reshaping)}); these options do not apply: {', '.join(changed)}")
    target = moe_from_native(source_model, router=options.router, zero_experts=options.zero_experts,
                             copy_experts=options.copy_experts, pool=options.pool)
    target.conversion_report = {"resolved_options": options.as_dict(), "imported_from": model_type}
    return target


@torch.no_grad()
def _fill_experts(source_model, target, options: MoERefactorOptions, activations) -> None:
    """The experts, shared expert and routers of every sparse layer, from the source's dense FFN (the tensors
    ``build_from_source`` leaves to the conversion)."""
    config = target.config
    for index, (src_layer, dst_layer) in enumerate(zip(source_model.model.layers, target.model.layers)):
        mlp, moe = src_layer.mlp, dst_layer.mlp
        if getattr(mlp.gate_proj, "bias", None) is not None:
            raise ValueError(f"layer {index}: FFN projections with bias (mlp_bias=True) are not supported by the MoE "
                             "experts")
        gate, up, down = mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight
        if options.method == "upcycle":
            groups = [torch.arange(gate.shape[0])] * options.experts
        else:
            shared, groups = split_neurons(gate, options, activations[index] if activations else None, index)
            if not partition_groups_cover_all_neurons(shared, groups, gate.shape[0]):
                raise RuntimeError(f"layer {index}: the {options.split} split lost or duplicated FFN neurons")
            if shared.numel():
                moe.shared_expert.gate_proj.weight.copy_(gate[shared])
                moe.shared_expert.up_proj.weight.copy_(up[shared])
                moe.shared_expert.down_proj.weight.copy_(down[:, shared])
        experts = target.model.expert_pool if options.pool else moe.experts
        first = index * options.experts if options.pool else 0  # this layer's slice of the pool
        own = slice(first, first + options.experts)
        I = experts.gate_up_proj.shape[1] // 2
        for e, ids in enumerate(groups):
            experts.gate_up_proj[first + e, :I].copy_(gate[ids])
            experts.gate_up_proj[first + e, I:].copy_(up[ids])
            experts.down_proj[first + e].copy_(down[:, ids])
        if options.method == "read_me":  # no per-layer rows: the pre-gate plans every layer (distilled later)
            moe.router.temperature.zero_()
            continue
        router = moe.router.weight
        router.zero_()
        centroids = torch.stack([gate[ids].float().mean(0) for ids in groups])
        if options.method == "upcycle" and options.router_std > 0:
            generator = torch.Generator().manual_seed(options.seed + index)
            centroids = torch.randn(centroids.shape, generator=generator) * options.router_std
        if options.router_init == "centroid" or options.router_std > 0:
            router[own].copy_(centroids.to(router.dtype))
        if moe.router.residual_proj is not None:
            moe.router.residual_proj.weight.zero_()
        if getattr(moe.router, "temperature", None) is not None:
            moe.router.temperature.zero_()  # tempered_topk: equal weights over the chosen, exact with every expert
        if options.pool:
            moe.router.bias.zero_()
            foreign = torch.ones(config.moe_pool_size, dtype=torch.bool)
            foreign[own] = False
            bias = options.pool_foreign_bias
            if bias is None:
                if dst_layer.mlp_input_norm is None:
                    raise ValueError("pool with a default pool_foreign_bias needs an RMS-normalised MLP input to bound "
                                     "the router logits; this source's MLP reads the residual stream (post norms, "
                                     "OLMo-2): set pool_foreign_bias")
                bias = router_logit_bound(router[own], dst_layer.mlp_input_norm.weight) + 1.0
            moe.router.bias[: config.moe_pool_size][foreign] = -bias


def router_logit_bound(router_rows: torch.Tensor, norm_weight: torch.Tensor) -> float:
    """An upper bound on ``|w·x|`` for every router row ``w`` and every RMS-normalised router input
    ``x = γ ⊙ h/rms(h)``: ``‖x‖ ≤ max|γ|·√H``, so ``|w·x| ≤ max‖w‖ · max|γ| · √H``."""
    hidden = norm_weight.numel()
    return float(router_rows.float().norm(dim=-1).max() * norm_weight.float().abs().max() * math.sqrt(hidden))


def partition_groups_cover_all_neurons(shared: torch.Tensor, groups: list[torch.Tensor], intermediate: int) -> bool:
    """Every neuron in exactly one place (a check the tests and the conversion record use)."""
    ids = torch.cat([shared, *groups]).sort().values
    return ids.numel() == intermediate and bool((ids == torch.arange(intermediate)).all())
