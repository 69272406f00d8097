"""Dense-to-sparse gate annealing: lower every ``activation_dense_to_sparse`` router's temperature during training.

    trainer = Trainer(model=model, ..., callbacks=[DenseToSparseAnnealing(end_temperature=0.1)])

The temperature moves geometrically from each router's value at the start of training to ``end_temperature`` by the
last step (``trainer.state.max_steps``), so the gate starts spread over every expert and ends concentrated on a few
(those above ``moe_router_threshold`` stay active). The temperature reached is a saved buffer of each router: the
checkpoint runs at the sparsity training ended with. Logged as ``moe/router_temperature``.
"""

from __future__ import annotations

from transformers import TrainerCallback

__all__ = ["DenseToSparseAnnealing", "dense_to_sparse_routers"]


def dense_to_sparse_routers(model) -> list:
    from hf_arch.layers.moe_routers import DenseToSparseRouter

    return [m for m in model.modules() if isinstance(m, DenseToSparseRouter)]


class DenseToSparseAnnealing(TrainerCallback):
    def __init__(self, end_temperature: float) -> None:
        if not end_temperature > 0:
            raise ValueError(f"DenseToSparseAnnealing: end_temperature must be > 0, got {end_temperature!r}")
        self.end_temperature = float(end_temperature)
        self.routers, self.start = [], []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.routers = dense_to_sparse_routers(model) if model is not None else []
        if model is not None and not self.routers:
            raise ValueError("DenseToSparseAnnealing: the model has no moe_router='activation_dense_to_sparse' router")
        self.start = [float(r.temperature) for r in self.routers]

    def temperature_at(self, start: float, step: int, max_steps: int) -> float:
        progress = min(max(step / max(max_steps, 1), 0.0), 1.0)
        return start * (self.end_temperature / start) ** progress

    def on_step_begin(self, args, state, control, **kwargs):
        for router, start in zip(self.routers, self.start):
            router.temperature.fill_(self.temperature_at(start, state.global_step, state.max_steps))

    def on_train_end(self, args, state, control, **kwargs):
        for router, start in zip(self.routers, self.start):
            router.temperature.fill_(self.temperature_at(start, state.max_steps, state.max_steps))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.routers and logs is not None and "loss" in logs:
            logs["moe/router_temperature"] = float(self.routers[0].temperature)
            if state.log_history and state.log_history[-1].get("step") == state.global_step:
                state.log_history[-1]["moe/router_temperature"] = logs["moe/router_temperature"]
