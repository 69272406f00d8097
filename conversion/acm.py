"""``--to acm``: a Llama-family model's dense SwiGLU FFNs → Adaptive Computation Modules (``layers/acm.py``), the
ACM paper's "ACMization" by distillation, layer by layer.

1. **Learners from neurons.** A SwiGLU is a sum over its neurons; ranked by their mean contribution on calibration
   text (``|silu(g·x)·(u·x)|·‖d‖``), the neurons are cut into ``learners`` groups, most important first (equal, or
   the first ``I % learners`` one neuron wider). Every learner running is the dense FFN exactly, and each prefix is
   the FFN's most important part.
2. **Prefix distillation** (``learner_steps``): on the source's FFN inputs, the learners are trained so that every
   prefix sum approximates the FFN output (mean over prefixes of the relative squared error, Adam, full batch). The
   full chain stays close to the FFN, the short ones get better.
3. **Gate distillation** (``gate_steps``): each token's target is the fewest learners whose prefix is within
   ``tolerance`` relative error of the FFN output; the gate learns it by cross-entropy.

Each layer's steps read only that layer's captured inputs, so layers are independent (one could train them in
parallel; here they run one after another). Recorded per layer: the mean learners per token on the calibration
tokens and the relative error of the gated output before fine-tuning.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from ..layers.mlp import neuron_groups
from ..models.hybrid import HybridConfig, HybridForCausalLM
from .moe_router_distill import layer_ffn_inputs
from .sources import adapter_for
from .weights import build_from_source

__all__ = ["ACMConversionOptions", "acmize"]

# The source's dense FFN and the learners it becomes: mapped by this conversion, not copied by name.
FFN_AND_LEARNERS = r"\.mlp\.(learners\.\d+\.)?(gate_proj|up_proj|down_proj)\."
MIN_CALIBRATION_TOKENS = 256


@dataclass
class ACMConversionOptions:
    learners: int = 4
    learner_steps: int = 200
    gate_steps: int = 300
    tolerance: float = 0.1
    learning_rate: float = 1e-3
    calibration_tokens: int = 4096
    # β of the converted model's compute price (mixer_options['acm'].compute_loss_weight): fine-tuning then trades
    # learners for loss instead of opening every gate
    compute_loss_weight: float = 0.0

    def validate(self, intermediate_size: int) -> None:
        for name, minimum in (("learners", 1), ("learner_steps", 0), ("gate_steps", 0), ("calibration_tokens", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
        neuron_groups(intermediate_size, self.learners, "learners")  # refuses a learner with no neuron
        if not (isinstance(self.tolerance, (int, float)) and 0 < self.tolerance < 1):
            raise ValueError(f"tolerance must be in (0, 1), got {self.tolerance!r}")
        if not (isinstance(self.compute_loss_weight, (int, float)) and self.compute_loss_weight >= 0):
            raise ValueError(f"compute_loss_weight must be >= 0, got {self.compute_loss_weight!r}")
        if not (isinstance(self.learning_rate, (int, float)) and self.learning_rate > 0):
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate!r}")

    @property
    def needs_calibration(self) -> bool:
        """Ranking neurons and both distillations read calibration text; with both step counts 0 the learners are
        the neurons in their stored order and every gate opens them all (the dense model, for training from)."""
        return self.learner_steps > 0 or self.gate_steps > 0

    def as_dict(self) -> dict:
        return asdict(self)


def _swiglu_neurons(mlp, x: torch.Tensor) -> torch.Tensor:
    """``[N, I]``: each neuron's activation ``silu(g·x)·(u·x)`` on ``x [N, H]`` (fp32)."""
    return F.silu(x @ mlp.gate_proj.weight.float().T) * (x @ mlp.up_proj.weight.float().T)


def _prefix_outputs(learners, x: torch.Tensor) -> torch.Tensor:
    """``[N, L, H]``: the running sums of the learners' outputs (prefix ``j`` = learners ``0..j``)."""
    outputs = torch.stack([learner(x) for learner in learners], dim=1)
    return outputs.cumsum(dim=1)


def _relative_errors(prefixes: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``[N, L]``: ``‖prefix − target‖² / ‖target‖²`` per token and prefix."""
    scale = target.pow(2).sum(-1, keepdim=True).clamp_min(1e-12)
    return (prefixes - target[:, None]).pow(2).sum(-1) / scale


def acmize(source_model, options: ACMConversionOptions | None = None, calibration_ids: torch.Tensor | None = None,
           calibration_mask: torch.Tensor | None = None) -> HybridForCausalLM:
    options = options or ACMConversionOptions()
    config = source_model.config
    options.validate(config.intermediate_size)
    if calibration_ids is None and options.needs_calibration:
        raise ValueError("--to acm needs calibration tokens (calibration_ids; `hf-arch convert` reads them from "
                         "--calibration-file): the neuron ranking and both distillations read the FFN's inputs "
                         "(or set learner_steps=0 and gate_steps=0 for the exact, undistilled split)")
    if calibration_ids is not None:
        given = int(calibration_mask.sum()) if calibration_mask is not None else calibration_ids.numel()
        if given < MIN_CALIBRATION_TOKENS:
            raise ValueError(f"the calibration text gives {given} tokens; --to acm needs at least "
                             f"{MIN_CALIBRATION_TOKENS}")
    kwargs = adapter_for(config).backbone_kwargs(config)
    if kwargs.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act={kwargs['hidden_act']!r}: ACM learners are SwiGLU (silu) MLPs, so a "
                         f"{config.model_type} FFN cannot become learners exactly")
    target_config = HybridConfig(**kwargs, channel_mixer_types=["acm"] * config.num_hidden_layers,
                                 mixer_options={"acm": {"learners": options.learners,
                                                        **({"compute_loss_weight": options.compute_loss_weight}
                                                           if options.compute_loss_weight else {})}})
    inputs = layer_ffn_inputs(source_model, calibration_ids, calibration_mask) if calibration_ids is not None else None
    bounds = [0, *itertools.accumulate(neuron_groups(config.intermediate_size, options.learners, "learners"))]

    def fill(target) -> None:
        for index, (src, dst) in enumerate(zip(source_model.model.layers, target.model.layers)):
            mlp, acm = src.mlp, dst.mlp
            if getattr(mlp.gate_proj, "bias", None) is not None:
                raise ValueError(f"layer {index}: FFN projections with bias (mlp_bias=True) cannot become learners")
            if inputs is None:  # no calibration: the stored order
                order = torch.arange(mlp.gate_proj.weight.shape[0])
            else:
                contribution = (_swiglu_neurons(mlp, inputs[index]).abs().mean(0)
                                * mlp.down_proj.weight.float().norm(dim=0))
                order = contribution.argsort(descending=True)
            for j, learner in enumerate(acm.learners):
                ids = order[bounds[j]:bounds[j + 1]]
                learner.gate_proj.weight.copy_(mlp.gate_proj.weight[ids])
                learner.up_proj.weight.copy_(mlp.up_proj.weight[ids])
                learner.down_proj.weight.copy_(mlp.down_proj.weight[:, ids])
            acm.gate_weight.zero_()
            acm.gate_bias.zero_()
            acm.gate_bias[-1] = 1.0  # every learner runs: the dense FFN, until the gate is distilled

    target = build_from_source(source_model, target_config, HybridForCausalLM, fill, replaced=FFN_AND_LEARNERS)
    report = []
    for index, (src, dst) in enumerate(zip(source_model.model.layers, target.model.layers)):
        if inputs is None:
            continue
        report.append(_distill_layer(src.mlp, dst.mlp, inputs[index], options))
        report[-1]["layer"] = index
    target.conversion_report = {"resolved_options": options.as_dict(), "acm_distillation": report}
    return target


def _distill_layer(mlp, acm, x: torch.Tensor, options: ACMConversionOptions) -> dict:
    with torch.no_grad():
        target = mlp(x.to(mlp.down_proj.weight.dtype)).float()
    dtype = acm.gate_weight.dtype
    acm.float()
    learner_params = [p for learner in acm.learners for p in learner.parameters()]
    with torch.enable_grad():  # conversions run under no_grad
        if options.learner_steps:
            optimizer = torch.optim.Adam(learner_params, lr=options.learning_rate)
            for _ in range(options.learner_steps):
                loss = _relative_errors(_prefix_outputs(acm.learners, x), target).mean()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        with torch.no_grad():
            errors = _relative_errors(_prefix_outputs(acm.learners, x), target)  # [N, L]
            reached = errors <= options.tolerance
            reached[:, -1] = True  # the whole chain when no prefix reaches the tolerance
            labels = reached.float().argmax(dim=-1)  # the first prefix that reaches it
        if options.gate_steps:
            gate = [acm.gate_weight, acm.gate_bias]
            optimizer = torch.optim.Adam(gate, lr=10 * options.learning_rate)
            for _ in range(options.gate_steps):
                loss = F.cross_entropy(acm.gate_logits(x), labels)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
    with torch.no_grad():
        counts = acm.learner_counts(x)
        gated = errors.gather(1, (counts - 1)[:, None])[:, 0]
        full_error = float(errors[:, -1].mean())
    acm.to(dtype)
    return {"mean_learners": round(float(counts.float().mean()), 4),
            "target_learners": round(float(labels.float().mean()) + 1, 4),
            "gate_accuracy": round(float((counts - 1 == labels).float().mean()), 4),
            "gated_relative_error": round(float(gated.mean()), 5),
            "full_chain_relative_error": round(full_error, 6)}
