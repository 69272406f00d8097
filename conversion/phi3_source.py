"""Phi-3 checkpoints as the Mistral model they equal, so every conversion kind takes them.

Phi-3 is Mistral with two fused projections: ``qkv_proj`` = [q | k | v] rows and ``gate_up_proj`` = [gate | up]
rows (its MLP computes ``up * act(gate)`` from the two halves); its optional sliding window covers every layer, as
Mistral's does. Splitting the two tensors is exact, and :func:`phi3_as_mistral` checks it on the logits. Refused:
partial rotary embeddings (Phi-4-mini's ``partial_rotary_factor``: part of each head unrotated) and LongRoPE
(Phi-3's generation drops the cache when a prompt crosses ``original_max_position_embeddings``, which a converted
model would not do).
"""

from __future__ import annotations

import copy

import torch

__all__ = ["phi3_as_mistral"]

_COPIED_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps",
                  "tie_word_embeddings", "attention_dropout", "sliding_window", "pad_token_id", "bos_token_id",
                  "eos_token_id")


def _check_convertible(config) -> None:
    rope = dict(getattr(config, "rope_parameters", None) or {})
    factor = rope.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0)) or 1.0
    if factor != 1.0:
        raise ValueError(f"phi3 source: rope_parameters.partial_rotary_factor={factor} rotates only part of each "
                         "head; the conversions support whole-head RoPE only")
    if rope.get("rope_type") == "longrope":
        raise ValueError("phi3 source: rope_type 'longrope' switches RoPE factors (and drops the cache) past "
                         "original_max_position_embeddings during generation; only fixed RoPE sources convert")


def _mistral_state(phi3_state: dict, config) -> dict:
    """Phi-3 tensor names and layouts -> Mistral's; every Phi-3 tensor is used exactly once."""
    H, H_kv = config.num_attention_heads, config.num_key_value_heads
    D = config.hidden_size // H
    out = {}
    for name, tensor in phi3_state.items():
        if name.endswith("self_attn.qkv_proj.weight"):
            prefix = name[: -len("qkv_proj.weight")]
            q, k, v = tensor.split([H * D, H_kv * D, H_kv * D], dim=0)
            out.update({prefix + "q_proj.weight": q, prefix + "k_proj.weight": k, prefix + "v_proj.weight": v})
        elif name.endswith("mlp.gate_up_proj.weight"):
            prefix = name[: -len("gate_up_proj.weight")]
            gate, up = tensor.chunk(2, dim=0)
            out.update({prefix + "gate_proj.weight": gate, prefix + "up_proj.weight": up})
        else:
            out[name] = tensor
    return out


@torch.no_grad()
def phi3_as_mistral(model, check_tokens: int = 16):
    """A ``MistralForCausalLM`` computing what the Phi-3 ``model`` computes (same dtype, attention backend and
    generation config); raises ``ValueError`` naming the feature that prevents it, or ``RuntimeError`` when the
    logits of the two differ on random tokens (more than 1e-5 in fp32)."""
    from transformers import MistralConfig, MistralForCausalLM

    source = model.config
    _check_convertible(source)
    fields = {name: getattr(source, name) for name in _COPIED_FIELDS if hasattr(source, name)}
    config = MistralConfig(**fields, head_dim=source.hidden_size // source.num_attention_heads,
                           rope_parameters=copy.deepcopy(dict(source.rope_parameters or {})) or None)
    config._attn_implementation = source._attn_implementation
    dtype = next(model.parameters()).dtype
    mistral = MistralForCausalLM(config).to(dtype).eval()
    state = _mistral_state(model.state_dict(), source)
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    missing, unexpected = mistral.load_state_dict(state, strict=False)
    missing = [n for n in missing if not (config.tie_word_embeddings and n == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"phi3 source: tensors that do not map onto Mistral: unexpected {sorted(unexpected)[:5]}, "
                         f"missing {sorted(missing)[:5]}")
    if config.tie_word_embeddings:
        mistral.tie_weights()
    mistral.generation_config = copy.deepcopy(model.generation_config)

    tokens = torch.randint(0, source.vocab_size, (1, check_tokens), generator=torch.Generator().manual_seed(0))
    tokens = tokens.to(next(model.parameters()).device)
    expected, got = model(tokens).logits.float(), mistral(tokens).logits.float()
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2 * expected.abs().max().item()
    if (expected - got).abs().max().item() > tolerance:
        raise RuntimeError(f"phi3 source: the Mistral form differs from the source by max |Δlogit| "
                           f"{(expected - got).abs().max().item():.3g}")
    return mistral
