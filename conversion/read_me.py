"""Read-ME's router distillation: fit the model's one pre-gate (``layers/pre_gate.py``) so that, from each token's
embedding alone, it ranks first the experts that carry the dense FFN's output in every sparse layer.

Targets per layer are those of ``moe_router_distill`` (the ``k`` experts a greedy search adds to bring the experts'
sum closest to the dense output, on the source's FFN inputs); the pre-gate is trained on all layers at once (binary
cross-entropy on membership, full batch, Adam) from the embeddings of the same calibration tokens. Reported per
layer: the share of target experts the planned top-k recovers, before and after.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .moe_router_distill import expert_outputs, greedy_expert_targets, layer_ffn_inputs

__all__ = ["distill_pre_gate"]


def distill_pre_gate(source_model, target_model, calibration_ids: torch.Tensor, calibration_mask=None,
                     steps: int = 300, learning_rate: float = 3e-3, inputs: list[torch.Tensor] | None = None
                     ) -> list[dict]:
    pre_gate = target_model.model.pre_gate
    if pre_gate is None:
        raise ValueError("distill_pre_gate needs a model with moe_router='pre_gated' (model.pre_gate)")
    if inputs is None:
        inputs = layer_ffn_inputs(source_model, calibration_ids, calibration_mask)
    real = calibration_mask.reshape(-1).bool() if calibration_mask is not None else None
    with torch.no_grad():
        embeddings = target_model.model._embed(calibration_ids).reshape(-1, target_model.config.hidden_size).float()
        if real is not None:
            embeddings = embeddings[real]
        targets, ks = [], []
        for layer in pre_gate.sparse_layers:
            moe = target_model.model.layers[layer].mlp
            outputs = expert_outputs(moe.experts, 0, moe.num_ffn, inputs[layer])
            targets.append(greedy_expert_targets(outputs, outputs.sum(1), min(moe.top_k, moe.num_ffn)).float())
            ks.append(moe.top_k)
        if pre_gate.num_experts > targets[0].shape[1]:  # zero-computation experts: never targets
            targets = [F.pad(t, (0, pre_gate.num_experts - t.shape[1])) for t in targets]
        targets = torch.stack(targets, dim=1)  # [N, S, E]
    dtype = next(pre_gate.parameters()).dtype
    pre_gate.float()

    def recall() -> list[float]:
        with torch.no_grad():
            logits = pre_gate(embeddings[:, None])[:, 0]  # [N, S, E]
            return [float(targets[:, s].gather(1, logits[:, s].topk(k, -1).indices).sum() / targets[:, s].sum())
                    for s, k in enumerate(ks)]

    before = recall()
    optimizer = torch.optim.Adam(pre_gate.parameters(), lr=learning_rate)
    loss = torch.zeros(())
    with torch.enable_grad():  # conversions run under no_grad
        for _ in range(steps):
            loss = F.binary_cross_entropy_with_logits(pre_gate(embeddings[:, None])[:, 0], targets)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    after = recall()
    pre_gate.to(dtype)
    return [{"layer": layer, "recall_before": round(b, 4), "recall_after": round(a, 4), "loss": round(float(loss), 5)}
            for layer, b, a in zip(pre_gate.sparse_layers, before, after)]
