"""The ``acm`` channel mixer: an Adaptive Computation Module (Wójcik et al., "Adaptive Computation Modules: Granular
Conditional Computation For Efficient Inference"). A chain of ``learners`` small SwiGLU learners, each adding a
refinement to the sum of the ones before it; a per-token gate decides how many run.

    m = argmax gate(x) + 1             (1 ≤ m ≤ N)
    out = Σ_{j < m} learner_j(x)

Inference runs learner ``j`` only on the tokens whose ``m > j`` (the compute saving). Training uses the same hard
count forward and the gate's softmax backward (straight-through, with Gumbel noise of temperature ``gate_tau``), so
what trains is what runs. ``hf-arch convert SRC OUT --to acm`` builds one from a dense FFN: the FFN's neurons, most
important first, become the learners (all ``N`` running is the dense FFN exactly), then each layer's learners are
distilled so every prefix approximates the FFN and the gate learns the fewest learners that reach a tolerance
(``conversion/acm.py``; layer by layer, independent, so in parallel if wanted).

Options in ``config.mixer_options["acm"]``: ``learners`` (N; at most ``intermediate_size``: the FFN's width split as
evenly as it goes, the first ``intermediate_size % N`` learners one neuron wider), ``gate_tau``, and
``compute_loss_weight`` (β ≥ 0): in training the layer reports ``β · E[m] / N`` (the expected share of learners run,
under the gate's softmax) as ``compute_loss``, which the model adds to its loss — the price of compute the ACM paper
trains its gates with; without it (β = 0, the default) nothing in a distillation or next-token loss stops the gates
from opening every learner.
``last_learners`` holds the mean learners per token of the last forward (for reports).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .mixer_registry import mixer_options, register_channel_mixer
from .mlp import HfArchMLP, neuron_groups

__all__ = ["ACMOptions", "AdaptiveComputationModule"]


@dataclass(frozen=True)
class ACMOptions:
    learners: int = 4
    gate_tau: float = 1.0
    compute_loss_weight: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.learners, int) or isinstance(self.learners, bool) or self.learners < 1:
            raise ValueError(f"mixer_options['acm'].learners must be an integer >= 1, got {self.learners!r}")
        if not (isinstance(self.gate_tau, (int, float)) and self.gate_tau > 0):
            raise ValueError(f"mixer_options['acm'].gate_tau must be > 0, got {self.gate_tau!r}")
        if not (isinstance(self.compute_loss_weight, (int, float)) and self.compute_loss_weight >= 0):
            raise ValueError(f"mixer_options['acm'].compute_loss_weight must be >= 0, got {self.compute_loss_weight!r}")


@register_channel_mixer("acm")
class AdaptiveComputationModule(nn.Module):
    # read by peft_utils: nothing here has a Llama name (the learners hold the dense FFN's neurons under new names;
    # `--to acm` fills them), so all of it is new
    new_parameters = ("gate_weight", "gate_bias", "learners")
    routes_tokens = False
    reports_auxiliary = True  # mixer(x) returns (output, auxiliary dict): its compute price in training

    def __init__(self, config, layer_idx: int) -> None:
        super().__init__()
        options = mixer_options(config, "acm", ACMOptions)
        widths = neuron_groups(config.intermediate_size, options.learners, "mixer_options['acm'].learners")
        self.layer_idx = layer_idx
        self.num_learners = options.learners
        self.gate_tau = options.gate_tau
        self.compute_loss_weight = float(options.compute_loss_weight)
        self.learners = nn.ModuleList(HfArchMLP(config, intermediate_size=width) for width in widths)
        # The gate's own parameters (not an nn.Linear) so the model's init reaches init_parameters below.
        self.gate_weight = nn.Parameter(torch.empty(options.learners, config.hidden_size))
        self.gate_bias = nn.Parameter(torch.empty(options.learners))
        self.last_learners: float | None = None

    def init_parameters(self, init) -> None:
        init.zeros_(self.gate_weight)
        init.zeros_(self.gate_bias)
        with torch.no_grad():
            self.gate_bias[-1] = 1.0  # from scratch: every learner runs until the gate learns otherwise

    def gate_logits(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., N]`` fp32: logit ``i`` is for running ``i + 1`` learners."""
        return F.linear(x.float(), self.gate_weight.float(), self.gate_bias.float())

    def learner_counts(self, x: torch.Tensor) -> torch.Tensor:
        """``[...]`` long: how many learners each token runs (``argmax gate + 1``)."""
        return self.gate_logits(x).argmax(dim=-1) + 1

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """``(output, auxiliary)``: ``{"compute_loss": β · E[m] / N}`` in training with a compute price, else ``{}``."""
        logits = self.gate_logits(hidden_states)
        if self.training:
            noise = -torch.empty_like(logits).exponential_().log()  # Gumbel
            soft = ((logits + noise) / self.gate_tau).softmax(dim=-1)
            hard = F.one_hot(soft.argmax(dim=-1), self.num_learners).to(soft.dtype)
            choice = hard + soft - soft.detach()  # forward: the hard count; backward: the softmax
            # learner j runs when the count is > j: P(m > j) = Σ_{i ≥ j} choice_i
            runs = choice.flip(-1).cumsum(-1).flip(-1).to(hidden_states.dtype)
            out = sum(runs[..., j:j + 1] * learner(hidden_states) for j, learner in enumerate(self.learners))
            self.last_learners = float(hard.argmax(-1).float().mean()) + 1.0
            report = {}
            if self.compute_loss_weight:
                counts = torch.arange(1, self.num_learners + 1, device=soft.device, dtype=soft.dtype)
                expected_share = (soft * counts).sum(-1).mean() / self.num_learners
                report["compute_loss"] = self.compute_loss_weight * expected_share
            return out, report
        counts = logits.argmax(dim=-1) + 1
        if torch.compiler.is_compiling():  # a traced graph holds no data-dependent row counts: every learner, masked
            runs = (counts[..., None] > torch.arange(self.num_learners, device=counts.device)).to(hidden_states.dtype)
            return sum(runs[..., j:j + 1] * learner(hidden_states) for j, learner in enumerate(self.learners)), {}
        self.last_learners = float(counts.float().mean()) if counts.numel() else None
        flat = hidden_states.reshape(-1, hidden_states.shape[-1])
        flat_counts = counts.reshape(-1)
        out = torch.zeros_like(flat)
        for j, learner in enumerate(self.learners):
            rows = (flat_counts > j).nonzero(as_tuple=True)[0]
            if rows.numel() == flat.shape[0]:
                out = out + learner(flat)
            elif rows.numel():
                out.index_add_(0, rows, learner(flat.index_select(0, rows)))
        return out.view_as(hidden_states), {}
