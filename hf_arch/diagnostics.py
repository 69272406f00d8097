"""Diagnostics the Gated Attention paper reports: attention-sink share and gate-score statistics.

``attention_diagnostics(model, input_ids)`` runs one forward pass with eager attention (the only backend that
returns probabilities) and reports, per layer and overall:
- ``sink_share``: mean attention probability that queries (excluding the first token itself) put on token 0;
- ``gate_mean`` and a histogram of the output-gate scores (gated variants only).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from .layers.output_gate import AttentionOutputGate


@contextmanager
def _eager_attention(model):
    config = model.config
    previous = config._attn_implementation
    config._attn_implementation = "eager"
    try:
        yield
    finally:
        config._attn_implementation = previous


@torch.no_grad()
def attention_diagnostics(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, bins: int = 20) -> dict:
    if input_ids.shape[-1] < 2:
        raise ValueError(f"attention_diagnostics needs at least 2 tokens per sequence, got shape {tuple(input_ids.shape)}")
    gates = [m for m in model.modules() if isinstance(m, AttentionOutputGate)]
    gate_scores: list[torch.Tensor] = []
    hooks = [g.register_forward_hook(lambda mod, args, out: gate_scores.append(mod.scores(args[0]).float())) for g in gates]
    try:
        with _eager_attention(model):
            outputs = model(input_ids=input_ids, attention_mask=attention_mask, output_attentions=True, use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()

    valid = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    per_layer_sink = []
    for probs in outputs.attentions:  # [B, H, T, S]
        on_first = probs[..., 0].float()  # [B, H, T]
        queries = valid.clone()
        queries[:, 0] = False  # token 0 attending to itself is trivially 1
        weights = queries[:, None, :].expand_as(on_first)
        per_layer_sink.append((on_first * weights).sum().item() / weights.sum().clamp(min=1).item())
    result = {
        "tokens": int(valid.sum()),
        "sink_share": sum(per_layer_sink) / len(per_layer_sink),
        "sink_share_per_layer": per_layer_sink,
    }
    if gate_scores:
        scale = gates[0].scale
        flat = torch.cat([s[valid].flatten() for s in gate_scores])
        counts = torch.histc(flat, bins=bins, min=0.0, max=scale)
        result.update(
            gate_mean=flat.mean().item(),
            gate_mean_per_layer=[s[valid].mean().item() for s in gate_scores],
            gate_histogram={"edges": torch.linspace(0.0, scale, bins + 1).tolist(), "counts": counts.long().tolist()},
        )
    return result


def plot_gate_histogram(diagnostics: dict, path) -> None:
    """Save the gate-score histogram as a PNG (needs matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hist = diagnostics["gate_histogram"]
    edges, counts = hist["edges"], hist["counts"]
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.bar(edges[:-1], counts, width=edges[1] - edges[0], align="edge")
    ax.set_xlabel("gate score")
    ax.set_ylabel("count")
    ax.set_title(f"mean {diagnostics['gate_mean']:.3f}, sink share {diagnostics['sink_share']:.3f}")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
