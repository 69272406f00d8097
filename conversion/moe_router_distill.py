"""Router distillation for a partitioned MoE: before any end-to-end training, each layer's router learns, from
calibration text run through the dense source, which of its experts carry the dense FFN's output.

For every calibration token the layer's input ``x`` (the source's post-attention norm output) gives each expert's
output ``f_e(x)`` and the shared expert's ``s(x)``; together they are the dense FFN's output ``y`` exactly. The
target set is the ``k`` experts a greedy search picks to bring ``s + Σ f_e`` closest to ``y`` (each step adds the
expert that most reduces the residual). The router rows are then fitted to rank those experts first (binary
cross-entropy on membership, full batch, Adam): router only, every layer from one source pass, seconds on a CPU.
The router's weights over the chosen experts (``tempered_topk``'s temperature) are left as they are, so with every
expert active the model stays the dense one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["distill_routers", "greedy_expert_targets", "layer_ffn_inputs"]


@torch.no_grad()
def layer_ffn_inputs(source_model, input_ids: torch.Tensor, attention_mask=None) -> list[torch.Tensor]:
    """Per layer, the dense FFN's input on every real calibration token: ``[tokens, hidden]`` (fp32)."""
    captured, hooks = [], []
    real = attention_mask.reshape(-1).bool() if attention_mask is not None else None

    def hook(module, args):
        x = args[0].reshape(-1, args[0].shape[-1]).float()
        captured.append(x[real] if real is not None else x)

    for layer in source_model.model.layers:
        hooks.append(layer.mlp.register_forward_pre_hook(hook))
    try:
        source_model(input_ids=input_ids, attention_mask=attention_mask)
    finally:
        for h in hooks:
            h.remove()
    return captured


def expert_outputs(experts, first: int, count: int, x: torch.Tensor) -> torch.Tensor:
    """``[N, count, hidden]``: the outputs of experts ``first .. first + count`` (SwiGLU) on ``x [N, hidden]``."""
    gate_up = experts.gate_up_proj[first:first + count].float()
    down = experts.down_proj[first:first + count].float()
    width = gate_up.shape[1] // 2
    h = torch.einsum("nh,eih->nei", x, gate_up)
    return torch.einsum("nei,ehi->neh", F.silu(h[..., :width]) * h[..., width:], down)


def greedy_expert_targets(outputs: torch.Tensor, target: torch.Tensor, k: int) -> torch.Tensor:
    """``[N, E]`` bool: per token, the ``k`` experts a greedy search adds to bring ``Σ outputs`` closest to
    ``target [N, hidden]`` (outputs ``[N, E, hidden]``)."""
    N, E, _ = outputs.shape
    chosen = torch.zeros(N, E, dtype=torch.bool, device=outputs.device)
    residual = target.clone()
    rows = torch.arange(N, device=outputs.device)
    squared = outputs.pow(2).sum(-1)
    for _ in range(k):
        gain = 2 * torch.einsum("neh,nh->ne", outputs, residual) - squared  # ‖r‖² − ‖r − f_e‖²
        pick = gain.masked_fill(chosen, float("-inf")).argmax(-1)
        chosen[rows, pick] = True
        residual -= outputs[rows, pick]
    return chosen


def distill_routers(source_model, target_model, calibration_ids: torch.Tensor, calibration_mask=None,
                    steps: int = 200, learning_rate: float = 1e-2, first_expert=None,
                    inputs: list[torch.Tensor] | None = None) -> list[dict]:
    """Fit every sparse layer's router rows of ``target_model`` (a partition of ``source_model``'s FFNs) to the
    greedy targets. ``first_expert(layer)``: where the layer's experts start in its expert table (a global pool
    holds every layer's); ``inputs``: the layers' FFN inputs if already captured. Returns per layer the fraction of
    target experts the router's top-k recovers, before and after."""
    if inputs is None:
        inputs = layer_ffn_inputs(source_model, calibration_ids, calibration_mask)
    report = []
    for index, (layer, x) in enumerate(zip(target_model.model.layers, inputs)):
        moe = layer.mlp
        router = moe.router
        experts = moe.experts if moe.experts is not None else target_model.model.expert_pool
        count, k = target_model.config.num_experts, target_model.config.num_experts_per_tok
        first = first_expert(index) if first_expert is not None else 0
        with torch.no_grad():
            outputs = expert_outputs(experts, first, count, x)
            targets = greedy_expert_targets(outputs, outputs.sum(1), k).float()
        rows = router.weight[first:first + count].detach().float().clone().requires_grad_(True)
        optimizer = torch.optim.Adam([rows], lr=learning_rate)

        def recall() -> float:
            with torch.no_grad():
                top = (x @ rows.T).topk(k, dim=-1).indices
                return float(targets.gather(1, top).sum() / targets.sum())

        before = recall()
        with torch.enable_grad():  # conversions run under no_grad
            for _ in range(steps):
                loss = F.binary_cross_entropy_with_logits(x @ rows.T, targets)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        with torch.no_grad():
            router.weight[first:first + count].copy_(rows.to(router.weight.dtype))
        report.append({"layer": index, "recall_before": round(before, 4), "recall_after": round(recall(), 4),
                       "loss": round(float(loss), 5)})
    return report
