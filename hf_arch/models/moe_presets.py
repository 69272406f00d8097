"""The ``hfa_moe`` presets (see :mod:`.moe`): defaults that explicit config arguments override.

Kept apart from the model code because the exported remote-code configuration file needs them.
"""

from __future__ import annotations

MOE_PRESETS: dict[str, dict] = {
    "softmax_topk": {"moe_router": "softmax_topk"},
    "qwen_moe": {"moe_router": "softmax_topk", "num_shared_experts": 1, "shared_expert_gate": True},
    "moe_plus_plus": {
        "moe_router": "softmax_topk",
        "moe_zero_experts": 1,
        "moe_copy_experts": 1,
        "moe_constant_experts": 2,
        "moe_gating_residual": True,
    },
    "unipool": {"moe_router": "norm_router", "moe_expert_pool": "global", "moe_load_balance_scope": "pool"},
    "sinkhorn": {"moe_router": "sinkhorn", "moe_load_balance_coef": 0.0},
    "thor": {"moe_router": "stochastic", "moe_load_balance_coef": 0.0},
    "blockffn": {"moe_router": "relu_rmsnorm", "moe_load_balance_coef": 0.0, "moe_tls_coef": 1e-3,
                 "moe_cls_coef": 1e-3},
}


def half_layerwise_pool_size(kwargs: dict) -> int:
    """UniPool's reduced pool: half of ``num_experts`` per sparse layer, and never fewer than top-k."""
    layers = kwargs.get("num_hidden_layers", 12)
    types = kwargs.get("mlp_layer_types")
    step = kwargs.get("moe_sparse_step")
    if types is not None:
        sparse = sum(t == "sparse" for t in types)
    elif step:
        sparse = layers // step
    else:
        sparse = layers
    num_experts, top_k = kwargs.get("num_experts", 8), kwargs.get("num_experts_per_tok", 2)
    return max(top_k, (num_experts * max(sparse, 1)) // 2)
