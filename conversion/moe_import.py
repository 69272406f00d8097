"""Native MoE checkpoints (Qwen3-MoE, Mixtral, Qwen2-MoE) as the hfa_moe model they equal: ``--to moe --method
native``, the start for our MoE machinery (router kinds, zero-computation experts, expert pools, load-balancing
losses, routing statistics) on an already-sparse model.

The mapping is the inverse of :mod:`.native_export`: the native router ``mlp.gate`` is our softmax top-k router
(renormalised over the chosen experts where the source does: Mixtral always, the Qwen models by
``norm_topk_prob``), the fused expert tensors keep their layout, Qwen2-MoE's shared expert keeps its sigmoid gate,
and the source's dense layers (``mlp_only_layers`` / ``decoder_sparse_step``) stay dense. Checked on the logits.
"""

from __future__ import annotations

import copy

import torch

__all__ = ["NATIVE_MOE_TYPES", "moe_config_from_native", "moe_from_native"]

NATIVE_MOE_TYPES = ("qwen3_moe", "mixtral", "qwen2_moe")


def _sparse_layers(config) -> list[str]:
    """Which layers the source routes (its own rule: not in ``mlp_only_layers``, every ``decoder_sparse_step``-th)."""
    if config.model_type == "mixtral":
        return ["sparse"] * config.num_hidden_layers
    dense = set(getattr(config, "mlp_only_layers", None) or [])
    step = getattr(config, "decoder_sparse_step", 1) or 1
    return ["sparse" if i not in dense and (i + 1) % step == 0 else "dense" for i in range(config.num_hidden_layers)]


def moe_config_from_native(config):
    from hf_arch import MoEConfig

    from .sources import adapter_for

    mixtral = config.model_type == "mixtral"
    shared = config.model_type == "qwen2_moe" and (getattr(config, "shared_expert_intermediate_size", 0) or 0) > 0
    return MoEConfig(
        **adapter_for(config).backbone_kwargs(config),
        mlp_layer_types=_sparse_layers(config),
        num_experts=config.num_local_experts if mixtral else config.num_experts,
        num_experts_per_tok=config.num_experts_per_tok,
        moe_intermediate_size=config.intermediate_size if mixtral else config.moe_intermediate_size,
        num_shared_experts=1 if shared else 0,
        shared_expert_intermediate_size=config.shared_expert_intermediate_size if shared else None,
        shared_expert_gate=shared,
        moe_router="softmax_topk",
        moe_norm_topk_prob=True if mixtral else bool(config.norm_topk_prob),
        moe_routed_scale=1.0,
    )


def _our_names(state: dict) -> dict:
    return {name.replace(".mlp.gate.weight", ".mlp.router.weight"): tensor for name, tensor in state.items()}


@torch.no_grad()
def moe_from_native(source_model, check_tokens: int = 16):
    """The hfa_moe model equal to a native MoE ``source_model`` (same dtype, attention backend, generation config).
    Raises ``ValueError`` naming tensors that have no place, ``RuntimeError`` when the logits differ (> 1e-5 fp32)."""
    from hf_arch import MoEForCausalLM

    source = source_model.config
    if source.model_type not in NATIVE_MOE_TYPES:
        raise ValueError(f"--method native imports a {' / '.join(NATIVE_MOE_TYPES)} checkpoint; the source is "
                         f"{source.model_type!r} (dense sources convert with --method partition or upcycle)")
    config = moe_config_from_native(source)
    config._attn_implementation = source._attn_implementation
    dtype = next(source_model.parameters()).dtype
    target = MoEForCausalLM(config).to(dtype).eval()
    state = _our_names(source_model.state_dict())
    tied = config.tie_word_embeddings
    missing, unexpected = target.load_state_dict(state, strict=False)
    missing = [n for n in missing if not (tied and n == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"{source.model_type} source: tensors without a place in hfa_moe {sorted(unexpected)[:5]}, "
                         f"hfa_moe tensors the source lacks {sorted(missing)[:5]}")
    if tied:
        target.tie_weights()
    target.generation_config = copy.deepcopy(source_model.generation_config)

    tokens = torch.randint(0, source.vocab_size, (1, check_tokens), generator=torch.Generator().manual_seed(0))
    tokens = tokens.to(next(source_model.parameters()).device)
    expected, got = source_model(tokens).logits.float(), target(tokens).logits.float()
    diff = (expected - got).abs().max().item()
    if diff > (1e-5 if dtype == torch.float32 else 1e-2 * expected.abs().max().item()):
        raise RuntimeError(f"{source.model_type} source: the hfa_moe form differs by max |Δlogit| {diff:.3g}")
    return target
