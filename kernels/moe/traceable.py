"""The routed expert MLP as one opaque op for graph capture (``torch.compile(fullgraph=True)``, ``torch.export``).

The PyTorch path groups assignments by expert with per-expert row counts it reads on the host, which a traced graph
cannot hold (data-dependent shapes). Registered as a ``torch.library`` custom op with a shape-only fake, the whole
grouped computation is one node whose output is shaped like ``x``: the graph stays static and the op runs the same
grouped code when the graph executes. The backward is a second opaque op that recomputes the forward (the eager path
keeps its activations instead; a traced graph cannot carry the per-expert spans between the two).
"""

from __future__ import annotations

import torch

from .weighted import grouped_weighted_expert_mlp

__all__ = ["traceable_weighted_expert_mlp"]

# Not the package name: the remote-code copy of this module must register under the same name, and an op name is
# defined once per process (whichever copy loads first registers; both run the same code).
_NAMESPACE = "hfarch_moe"


def _define_ops():
    existing = getattr(torch.ops, _NAMESPACE, None)
    if existing is not None and hasattr(existing, "weighted_expert_mlp"):
        return existing.weighted_expert_mlp

    @torch.library.custom_op(f"{_NAMESPACE}::weighted_expert_mlp", mutates_args=())
    def forward(x: torch.Tensor, token_idx: torch.Tensor, expert_idx: torch.Tensor, weight: torch.Tensor,
                gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return grouped_weighted_expert_mlp(x, token_idx, expert_idx, weight, gate_up, down)

    @forward.register_fake
    def _(x, token_idx, expert_idx, weight, gate_up, down):
        return torch.empty_like(x)

    @torch.library.custom_op(f"{_NAMESPACE}::weighted_expert_mlp_backward", mutates_args=())
    def backward(grad: torch.Tensor, x: torch.Tensor, token_idx: torch.Tensor, expert_idx: torch.Tensor,
                 weight: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> list[torch.Tensor]:
        with torch.enable_grad():
            inputs = [t.detach().requires_grad_() for t in (x, weight, gate_up, down)]
            out = grouped_weighted_expert_mlp(inputs[0], token_idx, expert_idx, *inputs[1:])
            grads = torch.autograd.grad(out, inputs, grad, allow_unused=True)
        return [torch.zeros_like(t) if g is None else g for t, g in zip(inputs, grads)]

    @backward.register_fake
    def _(grad, x, token_idx, expert_idx, weight, gate_up, down):
        return [torch.empty_like(t) for t in (x, weight, gate_up, down)]

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def autograd_backward(ctx, grad):
        x, token_idx, expert_idx, weight, gate_up, down = ctx.saved_tensors
        grad_x, grad_weight, grad_up, grad_down = backward(grad, x, token_idx, expert_idx, weight, gate_up, down)
        return grad_x, None, None, grad_weight, grad_up, grad_down

    forward.register_autograd(autograd_backward, setup_context=setup_context)
    return forward


_weighted_expert_mlp_op = _define_ops()


def traceable_weighted_expert_mlp(x, token_idx, expert_idx, weight, gate_up, down) -> torch.Tensor:
    """Same contract as :func:`grouped_weighted_expert_mlp`, as a single graph node."""
    return _weighted_expert_mlp_op(x, token_idx, expert_idx, weight, gate_up, down)
