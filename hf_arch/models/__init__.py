"""Registered variants. Importing this module registers every variant with the transformers Auto classes."""

from ..registry import Variant, register_variant
from .affine_attention import (
    AffineAttentionConfig,
    AffineAttentionForCausalLM,
    AffineAttentionForSequenceClassification,
    AffineAttentionModel,
)
from .backbone import (
    HfArchForCausalLM,
    HfArchForSequenceClassification,
    HfArchModel,
    HfArchPreTrainedModel,
)
from .cubit import (
    CubitConfig,
    CubitForCausalLM,
    CubitForSequenceClassification,
    CubitModel,
)
from .diff_attention import (
    DiffAttentionConfig,
    DiffAttentionForCausalLM,
    DiffAttentionForSequenceClassification,
    DiffAttentionModel,
)
from .gated_attention import (
    GatedAttentionConfig,
    GatedAttentionForCausalLM,
    GatedAttentionForSequenceClassification,
    GatedAttentionModel,
)
from .gated_deltanet import (
    GatedDeltaNetConfig,
    GatedDeltaNetForCausalLM,
    GatedDeltaNetForSequenceClassification,
    GatedDeltaNetModel,
)
from .geonorm import (
    GeoNormConfig,
    GeoNormForCausalLM,
    GeoNormForSequenceClassification,
    GeoNormModel,
)
from .gla import GLAConfig, GLAForCausalLM, GLAForSequenceClassification, GLAModel
from .hybrid import HybridConfig, HybridForCausalLM, HybridForSequenceClassification, HybridModel
from .kda import KDAConfig, KDAForCausalLM, KDAForSequenceClassification, KDAModel
from .lightning import LightningConfig, LightningForCausalLM, LightningForSequenceClassification, LightningModel
from .tokenformer import (
    TokenFormerConfig,
    TokenFormerForCausalLM,
    TokenFormerForSequenceClassification,
    TokenFormerModel,
)
from .moe import (
    MOE_PRESETS,
    MoEConfig,
    MoEForCausalLM,
    MoEForSequenceClassification,
    MoEModel,
)
from .move import MoVEConfig, MoVEForCausalLM, MoVEForSequenceClassification, MoVEModel
from .sa_softmax import (
    SASoftmaxConfig,
    SASoftmaxForCausalLM,
    SASoftmaxForSequenceClassification,
    SASoftmaxModel,
)
from .sas import SASConfig, SASForCausalLM, SASForSequenceClassification, SASModel
from .sparse_attention import (
    SparseAttentionConfig,
    SparseAttentionForCausalLM,
    SparseAttentionForSequenceClassification,
    SparseAttentionModel,
)

GATED_ATTENTION = register_variant(
    Variant(
        name="gated_attention",
        config_class=GatedAttentionConfig,
        model_class=GatedAttentionModel,
        causal_lm_class=GatedAttentionForCausalLM,
        sequence_classification_class=GatedAttentionForSequenceClassification,
        summary="softmax attention with a query-dependent sigmoid output gate (headwise or elementwise, G1)",
        paper="Qiu et al., Gated Attention for Large Language Models (arXiv 2505.06708)",
        tags=("gated-attention",),
    )
)

GLA = register_variant(
    Variant(
        name="gla",
        config_class=GLAConfig,
        model_class=GLAModel,
        causal_lm_class=GLAForCausalLM,
        sequence_classification_class=GLAForSequenceClassification,
        summary="gated linear attention (data-dependent per-channel forget gate); layer and intra-layer hybrids",
        paper="Yang et al., Gated Linear Attention Transformers with Hardware-Efficient Training (arXiv 2312.06635)",
        tags=("linear-attention", "gla"),
    )
)

GATED_DELTANET = register_variant(
    Variant(
        name="gated_deltanet",
        config_class=GatedDeltaNetConfig,
        model_class=GatedDeltaNetModel,
        causal_lm_class=GatedDeltaNetForCausalLM,
        sequence_classification_class=GatedDeltaNetForSequenceClassification,
        summary="gated delta rule (scalar decay + write strength, short conv, L2 q/k); layer and intra-layer hybrids",
        paper="Yang et al., Gated Delta Networks: Improving Mamba2 with Delta Rule (arXiv 2412.06464)",
        tags=("linear-attention", "gated-deltanet"),
    )
)

LIGHTNING = register_variant(
    Variant(
        name="lightning",
        config_class=LightningConfig,
        model_class=LightningModel,
        causal_lm_class=LightningForCausalLM,
        sequence_classification_class=LightningForSequenceClassification,
        summary="Lightning attention (TransNormerLLM): linear attention with a fixed decay per head, LRPE, "
                "SRMSNorm-normalised gated output; alone or with softmax layers",
        paper="Qin et al., Scaling TransNormer to 175 Billion Parameters (arXiv 2307.14995); Lightning Attention-2 "
              "(arXiv 2401.04658)",
        tags=("linear-attention", "lightning", "transnormer"),
        examples={
            "lightning": {},
            # a softmax layer every other layer; the output gate as a sigmoid, no LRPE
            "lightning_hybrid": dict(full_attention_layers=[1],
                                     mixer_options={"lightning": dict(lrpe=False, output_gate="sigmoid")}),
        },
    )
)

TOKENFORMER = register_variant(
    Variant(
        name="tokenformer",
        config_class=TokenFormerConfig,
        model_class=TokenFormerModel,
        causal_lm_class=TokenFormerForCausalLM,
        sequence_classification_class=TokenFormerForSequenceClassification,
        summary="TokenFormer: every projection (q, k, v, o, FFN) is attention to learnable key / value parameter "
                "tokens; grows by adding parameter tokens with the function unchanged",
        paper="Wang et al., TokenFormer: Rethinking Transformer Scaling with Tokenized Model Parameters "
              "(arXiv 2410.23168)",
        tags=("tokenformer", "pattention", "growth"),
        examples={
            "tokenformer": {},
            # grown once: 8 more tokens per projection, Θ's scale kept at the counts it was created with
            "tokenformer_grown": dict(mixer_options={"pattention": dict(attention_param_tokens=40,
                                                                        attention_scale_tokens=32,
                                                                        ffn_param_tokens=45, ffn_scale_tokens=37)}),
        },
    )
)

MOE = register_variant(
    Variant(
        name="moe",
        config_class=MoEConfig,
        model_class=MoEModel,
        causal_lm_class=MoEForCausalLM,
        sequence_classification_class=MoEForSequenceClassification,
        summary="Mixture of Experts: softmax/sigmoid/ReLU/Norm, Selective Sinkhorn, THOR stochastic, dense-to-sparse, "
                "SqrtGate, DynaMoE and Read-ME pre-gated routers, MoE++ zero-computation experts, UniPool global "
                "expert pool, BlockFFN sparsity losses (presets: " + ", ".join(MOE_PRESETS) + ")",
        paper="Jin et al., MoE++ (arXiv 2410.07348); UniPool (arXiv 2605.06665); Song et al., BlockFFN "
              "(arXiv 2507.08771); Selective Sinkhorn Routing; THOR; DynaMoE; HyperP (SqrtGate); Read-ME",
        tags=("moe", "mixture-of-experts"),
        examples={
            "read_me_pre_gate": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                                     moe_router="pre_gated", moe_pre_gate_hidden=16),
            "sinkhorn": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, moe_preset="sinkhorn"),
            "dynamic_pyramid": dict(num_hidden_layers=3, num_experts=4, num_experts_per_tok=3,
                                    moe_intermediate_size=16, moe_router="dynamic_topk", moe_dynamic_k="complexity",
                                    moe_capacity_schedule="pyramid"),
        },
    )
)

SA_SOFTMAX = register_variant(
    Variant(
        name="sa_softmax",
        config_class=SASoftmaxConfig,
        model_class=SASoftmaxModel,
        causal_lm_class=SASoftmaxForCausalLM,
        sequence_classification_class=SASoftmaxForSequenceClassification,
        summary="Self-Adjust Softmax attention weights x·softmax(x) (plain or normalised by the row's range)",
        paper="Self-Adjust Softmax (SA-Softmax)",
        tags=("sa-softmax",),
    )
)

AFFINE_ATTENTION = register_variant(
    Variant(
        name="affine_attention",
        config_class=AffineAttentionConfig,
        model_class=AffineAttentionModel,
        causal_lm_class=AffineAttentionForCausalLM,
        sequence_classification_class=AffineAttentionForSequenceClassification,
        summary="affine-scaled attention (α(x)·softmax + β(x)) V per head and query; exact insertion at α=1, β=0",
        paper="Affine-Scaled Attention: Towards Flexible and Stable Transformer Attention",
        tags=("affine-attention",),
    )
)

MOVE = register_variant(
    Variant(
        name="move",
        config_class=MoVEConfig,
        model_class=MoVEModel,
        causal_lm_class=MoVEForCausalLM,
        sequence_classification_class=MoVEForSequenceClassification,
        summary="MoVE: one bank of learned value embeddings mixed into every attention layer's values by a soft gate "
                "(exact insertion at zero gate scale)",
        paper="MoVE: Mixture of Value Embeddings — A New Axis for Scaling Parametric Memory in Autoregressive Models",
        tags=("move", "value-embeddings"),
    )
)

DIFF_ATTENTION = register_variant(
    Variant(
        name="diff_attention",
        config_class=DiffAttentionConfig,
        model_class=DiffAttentionModel,
        causal_lm_class=DiffAttentionForCausalLM,
        sequence_classification_class=DiffAttentionForSequenceClassification,
        summary="Grouped Differential Attention: signal map minus λ·noise map, fewer noise heads shared GQA-style; "
                "exact growth by copying signal heads",
        paper="Grouped Differential Attention; Ye et al., Differential Transformer (arXiv 2410.05258)",
        tags=("differential-attention",),
    )
)

CUBIT = register_variant(
    Variant(
        name="cubit",
        config_class=CubitConfig,
        model_class=CubitModel,
        causal_lm_class=CubitForCausalLM,
        sequence_classification_class=CubitForSequenceClassification,
        summary="Cubit: attention as causal kernel ridge regression κ(Q,K)(κ(K,K)+λI)⁻¹V with Limited-Range Rescale "
                "of the values (O(T³) per head)",
        paper="Cubit: kernel ridge regression attention",
        tags=("krr-attention",),
    )
)

SAS = register_variant(
    Variant(
        name="sas",
        config_class=SASConfig,
        model_class=SASModel,
        causal_lm_class=SASForCausalLM,
        sequence_classification_class=SASForSequenceClassification,
        summary="Simulated Attention Score: attention over more, wider heads mixed from the real ones, aggregated back "
                "by PEAA",
        paper="SAS: Simulated Attention Score",
        tags=("simulated-attention",),
    )
)

GEONORM = register_variant(
    Variant(
        name="geonorm",
        config_class=GeoNormConfig,
        model_class=GeoNormModel,
        causal_lm_class=GeoNormForCausalLM,
        sequence_classification_class=GeoNormForSequenceClassification,
        summary="GeoNorm: geodesic residual updates on the sphere with a layer-wise update decay",
        paper="GeoNorm: geodesic updates for transformer normalization",
        tags=("geonorm",),
    )
)

SPARSE_ATTENTION = register_variant(
    Variant(
        name="sparse_attention",
        config_class=SparseAttentionConfig,
        model_class=SparseAttentionModel,
        causal_lm_class=SparseAttentionForCausalLM,
        sequence_classification_class=SparseAttentionForSequenceClassification,
        summary="learned sparse attention on a frozen model: SeerAttention block gates (block-sparse prefill) or a "
                "Flux layer router (full vs sink + sliding window per input)",
        paper="Gao et al., SeerAttention (arXiv 2410.13276); Qiu et al., Flux Attention (arXiv 2604.07394)",
        tags=("sparse-attention",),
    )
)

HYBRID = register_variant(
    Variant(
        name="hybrid",
        config_class=HybridConfig,
        model_class=HybridModel,
        causal_lm_class=HybridForCausalLM,
        sequence_classification_class=HybridForSequenceClassification,
        summary="any per-layer layout of registered token and channel mixers (token_mixer_types, mlp_layer_types, "
                "mixer_options), including mixers other packages register",
        paper="(composition of the registered mixers' papers)",
        tags=("hybrid",),
        examples={
            # Gated DeltaNet : MLA with MoE channel mixers (the Kimi Linear layout's shape, with GDN as its linear part).
            "gdn_mla_moe": dict(num_hidden_layers=2, token_mixer_types=["gated_deltanet", "mla"],
                                linear_attn_type="gated_deltanet", linear_attn_conv_size=4, linear_attn_qk_norm="l2",
                                mixer_options={"mla": dict(kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
                                                           v_head_dim=8)},
                                mlp_layer_types=["dense", "sparse"], num_experts=4, num_experts_per_tok=2,
                                moe_intermediate_size=16),
            # DELTA (issue 22): layer 0 selects (4 salient keys per query, 1 sink, a 4-key window), layer 1 attends
            # only to its choice.
            "delta": dict(num_hidden_layers=2, token_mixer_types=["delta", "delta"],
                          mixer_options={"delta": {"dense_layers": 0, "token_budget": 4, "sink_tokens": 1,
                                                   "window_tokens": 4}}),
            # ACM and VersatileFFN channel mixers (issue 21); any intermediate_size splits into their groups.
            "acm_versatile": dict(num_hidden_layers=2, channel_mixer_types=["acm", "versatile"],
                                  mixer_options={"acm": {"learners": 2}, "versatile": {"virtual_experts": 2,
                                                                                        "top_k": 1}}),
        },
    )
)

_MLA = dict(kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8)  # small MLA shapes for examples

KDA = register_variant(
    Variant(
        name="kda",
        config_class=KDAConfig,
        model_class=KDAModel,
        causal_lm_class=KDAForCausalLM,
        sequence_classification_class=KDAForSequenceClassification,
        summary="Kimi Delta Attention: gated delta rule with a per-channel decay, short convs, low-rank decay and "
                "sigmoid output gate; alone, with softmax layers, or Kimi Linear's KDA : MLA 3 : 1 with MoE",
        paper="Kimi Team, Kimi Linear: An Expressive, Efficient Attention Architecture (arXiv 2510.26692)",
        tags=("linear-attention", "kda", "kimi-linear"),
        examples={
            "kda": {},
            "kda_attention": dict(full_attention_layers=[1], mixer_options={"kda": dict(conv_size=3)}),
            # Kimi Linear's layout: three KDA layers per MLA layer (NoPE), MoE after the first layer.
            "kimi_linear": dict(num_hidden_layers=4, token_mixer_types=["kda", "kda", "kda", "mla"],
                                mixer_options={"mla": _MLA}, mlp_layer_types=["dense", "sparse", "sparse", "sparse"],
                                num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16),
        },
    )
)

__all__ = [
    "KDA",
    "KDAConfig",
    "KDAForCausalLM",
    "KDAForSequenceClassification",
    "KDAModel",
    "HYBRID",
    "HybridConfig",
    "HybridForCausalLM",
    "HybridForSequenceClassification",
    "HybridModel",
    "CUBIT",
    "CubitConfig",
    "CubitForCausalLM",
    "CubitForSequenceClassification",
    "CubitModel",
    "DIFF_ATTENTION",
    "DiffAttentionConfig",
    "DiffAttentionForCausalLM",
    "DiffAttentionForSequenceClassification",
    "DiffAttentionModel",
    "GEONORM",
    "GeoNormConfig",
    "GeoNormForCausalLM",
    "GeoNormForSequenceClassification",
    "GeoNormModel",
    "SAS",
    "SASConfig",
    "SASForCausalLM",
    "SASForSequenceClassification",
    "SASModel",
    "MOVE",
    "MoVEConfig",
    "MoVEForCausalLM",
    "MoVEForSequenceClassification",
    "MoVEModel",
    "AFFINE_ATTENTION",
    "AffineAttentionConfig",
    "AffineAttentionForCausalLM",
    "AffineAttentionForSequenceClassification",
    "AffineAttentionModel",
    "SA_SOFTMAX",
    "SASoftmaxConfig",
    "SASoftmaxForCausalLM",
    "SASoftmaxForSequenceClassification",
    "SASoftmaxModel",
    "SPARSE_ATTENTION",
    "SparseAttentionConfig",
    "SparseAttentionForCausalLM",
    "SparseAttentionForSequenceClassification",
    "SparseAttentionModel",
    "MOE",
    "MOE_PRESETS",
    "MoEConfig",
    "MoEForCausalLM",
    "MoEForSequenceClassification",
    "MoEModel",
    "GATED_DELTANET",
    "LIGHTNING",
    "TOKENFORMER",
    "TokenFormerConfig",
    "TokenFormerForCausalLM",
    "TokenFormerForSequenceClassification",
    "TokenFormerModel",
    "LightningConfig",
    "LightningForCausalLM",
    "LightningForSequenceClassification",
    "LightningModel",
    "GLA",
    "GLAConfig",
    "GLAForCausalLM",
    "GLAForSequenceClassification",
    "GLAModel",
    "GatedDeltaNetConfig",
    "GatedDeltaNetForCausalLM",
    "GatedDeltaNetForSequenceClassification",
    "GatedDeltaNetModel",
    "GATED_ATTENTION",
    "GatedAttentionConfig",
    "GatedAttentionForCausalLM",
    "GatedAttentionForSequenceClassification",
    "GatedAttentionModel",
    "HfArchForCausalLM",
    "HfArchForSequenceClassification",
    "HfArchModel",
    "HfArchPreTrainedModel",
]
