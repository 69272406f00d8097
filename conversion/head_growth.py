"""Grouped Differential Attention growth: more signal heads by copying them, the function unchanged.

Each signal head becomes ``factor`` copies (query rows, λ and any output-gate rows repeated), and each copy gets
``1/factor`` of the head's ``o_proj`` columns, so the copies sum to the original head's contribution. Keys, values and
the noise heads are untouched: copy ``c`` of head ``h`` is head ``h·factor + c`` and still reads kv head ``h // (H/H_kv)``
and noise head ``h // (H/H_n)``. The grown model computes the same logits (up to the order of fp32 sums) and
training then lets the copies diverge — GDA's "group-differentiated growth", which grows only the signal group.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

import torch

from ..models.diff_attention import DiffAttentionConfig, DiffAttentionForCausalLM
from .weights import build_grown

__all__ = ["SignalHeadGrowthOptions", "grow_signal_heads"]

_QUERY_ROWS = re.compile(r"\.self_attn\.q_proj\.(weight|bias)$")
_GATE_ROWS = re.compile(r"\.self_attn\.output_gate\.proj(\.1)?\.(weight|bias)$")  # the gate's last projection
_OUTPUT_COLUMNS = re.compile(r"\.self_attn\.o_proj\.weight$")
_LAMBDA = re.compile(r"\.self_attn\.differential\.noise_lambda$")


@dataclass
class SignalHeadGrowthOptions:
    grow_signal_heads: int = 2  # each signal head becomes this many

    # Growth starts from a trained GDA model, not from a Llama-family checkpoint.
    source_model_types = ("hfa_diff_attention",)

    def config_overrides(self) -> dict:
        factor = self.grow_signal_heads
        if not isinstance(factor, int) or isinstance(factor, bool) or factor < 2:
            raise ValueError(f"grow_signal_heads must be an integer >= 2 (copies per signal head), got {factor!r}")
        return {}

    def as_dict(self) -> dict:
        return asdict(self)


def _repeat_heads(tensor: torch.Tensor, heads: int, factor: int, dim: int) -> torch.Tensor:
    """Repeat each of ``heads`` equal slices along ``dim`` ``factor`` times, in place order (h, h, …, h+1, …)."""
    shape = list(tensor.shape)
    per_head = shape[dim] // heads
    split = shape[:dim] + [heads, per_head] + shape[dim + 1:]
    grown = tensor.reshape(split).repeat_interleave(factor, dim=dim)
    shape[dim] *= factor
    return grown.reshape(shape)


@torch.no_grad()
def grow_signal_heads(source_model, opts: SignalHeadGrowthOptions) -> DiffAttentionForCausalLM:
    config = source_model.config
    if getattr(config, "model_type", None) != DiffAttentionConfig.model_type:
        raise ValueError(f"--to diff_attention grows a trained hfa_diff_attention model; the source is "
                         f"{getattr(config, 'model_type', None)!r} (train a GDA model first, or build one with "
                         "DiffAttentionConfig)")
    opts.config_overrides()
    factor, heads = opts.grow_signal_heads, config.num_attention_heads
    grown_config = DiffAttentionConfig.from_dict({**config.to_dict(), "num_attention_heads": heads * factor,
                                                  "head_dim": config.head_dim})
    grown_config._attn_implementation = config._attn_implementation
    state = {}
    for name, tensor in source_model.state_dict().items():
        if _QUERY_ROWS.search(name) or _GATE_ROWS.search(name) or _LAMBDA.search(name):
            tensor = _repeat_heads(tensor, heads, factor, dim=0)
        elif _OUTPUT_COLUMNS.search(name):
            tensor = _repeat_heads(tensor, heads, factor, dim=1) / factor
        state[name] = tensor
    return build_grown(source_model, grown_config, DiffAttentionForCausalLM, state)
