"""Native MoE checkpoints (Qwen3-MoE, Mixtral, Qwen2-MoE) as the hfa_moe model they equal: ``--to moe --method
native``, the start for our MoE machinery (router kinds, zero-computation experts, expert pools, load-balancing
losses, routing statistics) on an already-sparse model.

The mapping is the inverse of :mod:`.native_export`: the native router ``mlp.gate`` is our softmax top-k router
(renormalised over the chosen experts where the source does: Mixtral always, the Qwen models by
``norm_topk_prob``), the fused expert tensors keep their layout, Qwen2-MoE's shared expert keeps its sigmoid gate,
and the source's dense layers (``mlp_only_layers`` / ``decoder_sparse_step``) stay dense. Checked on the logits.

Options that reshape the imported MoE keep its function (checked the same way): ``router="tempered_topk"`` (with
temperature 1 it is the renormalised softmax top-k, so only for renormalising sources), MoE++ zero / copy experts
and a UniPool global expert pool. The new experts (and, in a pool, the other layers' experts) get zero router rows
and a bias below every logit the source's router can produce (the bound of ``moe_refactor.router_logit_bound``), so
no token reaches them until training moves the routers.
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


def moe_config_from_native(config, router: str | None = None, zero_experts: int = 0, copy_experts: int = 0,
                           pool: bool = False):
    from hf_arch import MoEConfig

    from .sources import adapter_for

    mixtral = config.model_type == "mixtral"
    experts = config.num_local_experts if mixtral else config.num_experts
    shared = config.model_type == "qwen2_moe" and (getattr(config, "shared_expert_intermediate_size", 0) or 0) > 0
    return MoEConfig(
        **adapter_for(config).backbone_kwargs(config),
        mlp_layer_types=_sparse_layers(config),
        num_experts=experts,
        num_experts_per_tok=config.num_experts_per_tok,
        moe_intermediate_size=config.intermediate_size if mixtral else config.moe_intermediate_size,
        num_shared_experts=1 if shared else 0,
        shared_expert_intermediate_size=config.shared_expert_intermediate_size if shared else None,
        shared_expert_gate=shared,
        moe_router=router or "softmax_topk",
        moe_norm_topk_prob=True if mixtral else bool(config.norm_topk_prob),
        moe_routed_scale=1.0,
        moe_zero_experts=zero_experts,
        moe_copy_experts=copy_experts,
        moe_router_bias=bool(zero_experts or copy_experts or pool),
        **(dict(moe_expert_pool="global", moe_pool_size=experts * config.num_hidden_layers) if pool else {}),
    )


def _our_names(state: dict) -> dict:
    return {name.replace(".mlp.gate.weight", ".mlp.router.weight"): tensor for name, tensor in state.items()}


def _check_reshaping(source, router, pool) -> None:
    renormalised = source.model_type == "mixtral" or bool(getattr(source, "norm_topk_prob", True))
    if router not in (None, "softmax_topk", "tempered_topk"):
        raise ValueError(f"router={router!r}: an imported router keeps its function only as softmax_topk or, when it "
                         "renormalises over the chosen experts, tempered_topk")
    if router == "tempered_topk" and not renormalised:
        raise ValueError(f"router='tempered_topk' renormalises over the chosen experts; this {source.model_type} "
                         "source does not (norm_topk_prob=False), so it would change the model")
    if pool and "dense" in _sparse_layers(source):
        raise ValueError(f"pool: every layer must be sparse to share one expert pool; this {source.model_type} "
                         f"source has dense layers {[i for i, t in enumerate(_sparse_layers(source)) if t == 'dense']}")


def _reshaped_state(state: dict, source, target, pool: bool) -> dict:
    """The native tensors under our names, moved into the global pool when there is one; zero router rows and an
    unreachable bias for every expert the source did not have (new zero / copy experts, other layers' pool slices)."""
    from .moe_refactor import router_logit_bound

    config = target.config
    E = config.num_experts
    renormalised = config.moe_norm_topk_prob or config.moe_router == "tempered_topk"
    margin = 1.0 if renormalised else 40.0  # unrenormalised softmax: e^-40 of the mass, below fp32 rounding
    out = dict(state)
    for i, kind in enumerate(config.mlp_layer_types):
        if kind != "sparse":
            continue
        p = f"model.layers.{i}.mlp."
        first = i * E if pool else 0
        if pool:
            for name in ("gate_up_proj", "down_proj"):
                out.setdefault(f"model.expert_pool.{name}", torch.zeros_like(target.state_dict()[
                    f"model.expert_pool.{name}"]))[first:first + E] = out.pop(p + f"experts.{name}")
        rows = out[p + "router.weight"]
        if config.moe_router_bias:
            full = torch.zeros(config.num_routed_experts, rows.shape[1], dtype=rows.dtype)
            full[first:first + E] = rows
            bound = router_logit_bound(rows, target.model.layers[i].mlp_input_norm.weight) + margin
            bias = torch.full((config.num_routed_experts,), -bound, dtype=rows.dtype)
            bias[first:first + E] = 0
            out[p + "router.weight"], out[p + "router.bias"] = full, bias
        if config.moe_router == "tempered_topk":
            out[p + "router.temperature"] = torch.ones((), dtype=rows.dtype)  # τ = 1: the renormalised softmax
    return out


@torch.no_grad()
def moe_from_native(source_model, check_tokens: int = 16, router: str | None = None, zero_experts: int = 0,
                    copy_experts: int = 0, pool: bool = False):
    """The hfa_moe model equal to a native MoE ``source_model`` (same dtype, attention backend, generation config),
    optionally with a tempered router, zero / copy experts or a global pool (all exact at import). Raises
    ``ValueError`` naming tensors that have no place or an option that would change the model, ``RuntimeError``
    when the logits differ (> 1e-5 fp32)."""
    from hf_arch import MoEForCausalLM

    source = source_model.config
    if source.model_type not in NATIVE_MOE_TYPES:
        raise ValueError(f"--method native imports a {' / '.join(NATIVE_MOE_TYPES)} checkpoint; the source is "
                         f"{source.model_type!r} (dense sources convert with --method partition or upcycle)")
    _check_reshaping(source, router, pool)
    config = moe_config_from_native(source, router, zero_experts, copy_experts, pool)
    config._attn_implementation = source._attn_implementation
    dtype = next(source_model.parameters()).dtype
    target = MoEForCausalLM(config).to(dtype).eval()
    state = _reshaped_state(_our_names(source_model.state_dict()), source, target, pool)
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
