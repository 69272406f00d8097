"""Routing statistics in training logs: ``moe/active_experts_per_token``, ``moe/max_load_ratio``,
``moe/zero_computation_share``, ``moe/chunk_level_sparsity_8``, … averaged over the steps since the last log.

    trainer = Trainer(model=moe_model, ..., callbacks=[RoutingStatsCallback()])

The callback switches collection on when training starts and adds the scalars to each training log entry (so they
reach ``trainer.state.log_history`` / ``trainer_state.json``, and the reporting integrations that run after it).
``hf-arch train`` adds it by itself to every model with sparse layers.
"""

from __future__ import annotations

from transformers import TrainerCallback

from ..layers.moe_stats import disable_routing_stats, enable_routing_stats

__all__ = ["RoutingStatsCallback", "has_moe_layers"]


def has_moe_layers(model) -> bool:
    config = getattr(model, "config", None)
    return "sparse" in (getattr(config, "mlp_layer_types", None) or [])


class RoutingStatsCallback(TrainerCallback):
    def __init__(self, chunk_size: int | None = None) -> None:
        self.chunk_size = chunk_size
        self.stats = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is not None and has_moe_layers(model):
            self.stats = enable_routing_stats(model, chunk_size=self.chunk_size)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.stats is None or logs is None or "loss" not in logs:  # training entries only
            return
        summary = self.stats.summary()
        self.stats.reset()
        logs.update(summary)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(summary)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if model is not None and self.stats is not None:
            disable_routing_stats(model)
        self.stats = None
