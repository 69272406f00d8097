"""MoDES training-free expert skipping on a pretrained MoE: ours, or transformers' own (Mixtral, Qwen2-MoE, Qwen3-MoE).

Globally-modulated local gating: every (token, expert) assignment of sparse layer ``l`` scores ``α_l · π``, ``π`` the
router's probability for that expert and ``α_l`` the layer's global importance; assignments scoring below the
threshold ``τ`` are dropped (their expert does not run for that token; weights are not renormalised).

    skipping = ExpertSkipping(model, importance=layer_importance(model, calibration_batches))
    skipping.threshold = threshold_for_skip_rate(skipping, model, calibration_batches, target=0.5)
    with skipping:                      # hooks on every router; removed on exit
        model.generate(...)
    skipping.skip_rate()                # share of assignments skipped since the last reset_counts()

``α_l``: how far the model's next-token distribution moves (mean KL over calibration tokens) when layer ``l``'s routed
experts are all skipped, divided by the mean over layers (so ``τ`` reads like a probability). The threshold for a
target skip rate starts at the quantile of the calibration scores and is corrected by a few passes with skipping on
(skipping moves later layers' scores). MoDES searches a frontier of per-modality thresholds; text has one modality,
so the search is over one threshold.

**The hook.** Our sparse layers: a forward hook on each ``MoERouter`` filters its ``Routing`` (skipped pairs are never
computed). transformers' MoE blocks (a module with ``gate`` and ``experts`` whose ``gate`` returns
``(router_logits, router_scores, router_indices)``, transformers 5's convention): a forward hook on ``gate`` zeroes
the skipped pairs' scores, with ``π = softmax(router_logits)`` at the chosen indices. The quality effect is exact; the
compute is saved only by an experts implementation that drops zero-weight pairs (transformers' loops still run them).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

__all__ = ["ExpertSkipping", "layer_importance", "measured_skip_rate", "skip_scores", "threshold_for_skip_rate"]


def _routers(model) -> list[tuple[str, torch.nn.Module, str]]:
    """``(name, module, kind)`` of every router in ``model`` in layer order; kind ``hf_arch`` or ``transformers``."""
    from .layers.moe_routers import MoERouter

    found = []
    for name, module in model.named_modules():
        if isinstance(module, MoERouter):
            found.append((name, module, "hf_arch"))
        elif (hasattr(module, "gate") and hasattr(module, "experts") and isinstance(module.gate, torch.nn.Module)
              and not isinstance(module.gate, MoERouter)):
            found.append((f"{name}.gate", module.gate, "transformers"))
    return found


class ExpertSkipping:
    """Hooks that drop low-scoring expert assignments from every router of ``model`` (see the module docstring)."""

    def __init__(self, model, threshold: float = 0.0, importance: list[float] | None = None) -> None:
        self.routers = _routers(model)
        if not self.routers:
            raise ValueError(f"{type(model).__name__} has no MoE routers: expert skipping needs hf-arch sparse layers "
                             "or transformers MoE blocks (a module with `gate` and `experts`)")
        if importance is not None:
            if len(importance) != len(self.routers):
                raise ValueError(f"importance has {len(importance)} values for {len(self.routers)} MoE layers")
            if any(not (float(a) >= 0) for a in importance):
                raise ValueError(f"importance values must be >= 0, got {list(importance)}")
        self.importance = [float(a) for a in importance] if importance is not None else [1.0] * len(self.routers)
        self.threshold = float(threshold)
        self.skip_all_layers: set[int] = set()  # layers whose routed experts are all skipped (calibration)
        self.record_scores = False
        self.scores: list[torch.Tensor] = []
        self._handles: list = []
        self.reset_counts()

    # -- counting ------------------------------------------------------------------------------------------------
    def reset_counts(self) -> None:
        self.assignments = [0] * len(self.routers)
        self.skipped = [0] * len(self.routers)

    def skip_rate(self) -> float:
        total = sum(self.assignments)
        return sum(self.skipped) / total if total else 0.0

    def layer_skip_rates(self) -> list[float]:
        return [s / a if a else 0.0 for s, a in zip(self.skipped, self.assignments)]

    # -- hooks ---------------------------------------------------------------------------------------------------
    def _keep(self, layer: int, probability: torch.Tensor) -> torch.Tensor:
        score = self.importance[layer] * probability.float()
        if self.record_scores:
            self.scores.append(score.detach().flatten().cpu())
        if layer in self.skip_all_layers:
            keep = torch.zeros_like(score, dtype=torch.bool)
        else:
            keep = score >= self.threshold
        self.assignments[layer] += keep.numel()
        self.skipped[layer] += int((~keep).sum())
        return keep

    def _ours(self, layer: int):
        def hook(router, inputs, routing):
            from .layers.moe_routers import Routing

            probability = type(router).probabilities(routing.logits)[routing.token_idx, routing.expert_idx]
            keep = self._keep(layer, probability)
            return Routing(routing.logits, routing.token_idx[keep], routing.expert_idx[keep], routing.weight[keep])

        return hook

    def _theirs(self, layer: int, name: str):
        def hook(gate, inputs, output):
            if not (isinstance(output, tuple) and len(output) == 3):
                raise TypeError(f"{name}: expected the router to return (router_logits, router_scores, "
                                f"router_indices) (transformers 5's MoE routers), got {type(output).__name__}")
            logits, scores, indices = output
            probability = logits.float().softmax(dim=-1).gather(-1, indices)
            keep = self._keep(layer, probability)
            return logits, scores * keep.to(scores.dtype), indices

        return hook

    def attach(self) -> "ExpertSkipping":
        if self._handles:
            return self
        for layer, (name, module, kind) in enumerate(self.routers):
            hook = self._ours(layer) if kind == "hf_arch" else self._theirs(layer, name)
            self._handles.append(module.register_forward_hook(hook))
        return self

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> "ExpertSkipping":
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()


def _batches_logprobs(model, batches: Iterable[dict]) -> list[torch.Tensor]:
    out = []
    for batch in batches:
        logits = model(**batch).logits.float()
        out.append(logits.log_softmax(-1))
    return out


def _mean_kl(reference: list[torch.Tensor], other: list[torch.Tensor], batches: list[dict]) -> float:
    total, count = 0.0, 0
    for ref, new, batch in zip(reference, other, batches):
        kl = (ref.exp() * (ref - new)).sum(-1)  # [B, T]
        mask = batch.get("attention_mask")
        real = mask.bool() if mask is not None else torch.ones_like(kl, dtype=torch.bool)
        total += float(kl[real].double().sum())
        count += int(real.sum())
    return total / max(count, 1)


@torch.no_grad()
def layer_importance(model, batches: list[dict], progress: bool = True) -> list[float]:
    """MoDES's global modulation ``α_l``: the mean KL of the next-token distribution when sparse layer ``l``'s routed
    experts are all skipped, over the calibration ``batches`` (model inputs), divided by its mean over layers."""
    from tqdm.auto import tqdm

    model.eval()
    skipping = ExpertSkipping(model)
    reference = _batches_logprobs(model, batches)
    shifts = []
    with skipping:
        for layer in tqdm(range(len(skipping.routers)), desc="MoDES layer importance", disable=not progress):
            skipping.skip_all_layers = {layer}
            shifts.append(_mean_kl(reference, _batches_logprobs(model, batches), batches))
    mean = sum(shifts) / len(shifts)
    if not mean > 0:
        raise ValueError("skipping any layer's experts leaves the calibration outputs unchanged: nothing to modulate")
    return [s / mean for s in shifts]


@torch.no_grad()
def skip_scores(skipping: ExpertSkipping, model, batches: list[dict]) -> torch.Tensor:
    """Every assignment's ``α_l · π`` over the calibration ``batches`` (threshold off)."""
    threshold, skipping.threshold = skipping.threshold, float("-inf")
    skipping.record_scores, skipping.scores = True, []
    try:
        with skipping:
            for batch in batches:
                model(**batch)
        return torch.cat(skipping.scores)
    finally:
        skipping.threshold, skipping.record_scores, skipping.scores = threshold, False, []
        skipping.reset_counts()


@torch.no_grad()
def measured_skip_rate(skipping: ExpertSkipping, model, batches: list[dict]) -> float:
    """The share of assignments skipped over ``batches`` at the current threshold (skipping on)."""
    skipping.reset_counts()
    with skipping:
        for batch in batches:
            model(**batch)
    rate = skipping.skip_rate()
    skipping.reset_counts()
    return rate


def threshold_for_skip_rate(skipping: ExpertSkipping, model, batches: list[dict], target: float,
                            refine_steps: int = 3) -> float:
    """A threshold at which a share ``target`` of the calibration assignments is skipped.

    First the ``target`` quantile of the scores with nothing skipped; skipping changes what later layers see, so
    their scores move a little, and ``refine_steps`` passes with skipping on shift the quantile level by the miss
    (``level += target − measured``), keeping the closest."""
    if not 0.0 <= target < 1.0:
        raise ValueError(f"target skip rate must be in [0, 1), got {target!r}")
    if target == 0.0:
        return float("-inf")
    scores = skip_scores(skipping, model, batches).double().sort().values

    def at(level: float) -> float:
        index = min(max(int(round(level * scores.numel())), 0), scores.numel() - 1)
        return float(scores[index])

    level, saved = target, skipping.threshold
    best = (math.inf, at(level))
    try:
        for _ in range(refine_steps + 1):
            skipping.threshold = at(level)
            miss = target - measured_skip_rate(skipping, model, batches) if refine_steps else 0.0
            if abs(miss) < best[0]:
                best = (abs(miss), skipping.threshold)
            if not refine_steps or abs(miss) * scores.numel() < 0.5:
                break
            level = min(max(level + miss, 0.0), 1.0)
    finally:
        skipping.threshold = saved
    return best[1]
