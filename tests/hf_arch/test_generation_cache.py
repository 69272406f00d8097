"""Every registered model type: cached generation equals uncached (greedy and beam search, left-padded batches),
and the cache is taken under both of transformers' names (`cache` from 5.25 on, `past_key_values` before)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import hf_arch
from hf_arch.configuration import LINEAR_LAYER_TYPES
from hf_arch.models.cache_names import CACHE_OUTPUT_FIELD
from hf_arch.registry import example_layouts

TINY = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, eos_token_id=1, bos_token_id=2)
# One layout per model type, plus the composed ones that stress the cache most (hybrids, sliding layers, MoE).
LAYOUTS = {
    "gated_attention": ("gated_attention", {}),
    "gated_attention_sliding": ("gated_attention", dict(layer_types=["sliding_attention", "full_attention"],
                                                        sliding_window=4)),
    "gla": ("gla", {}),
    "gla_full_hybrid": ("gla", dict(linear_to_full_ratio=1)),
    "gated_deltanet": ("gated_deltanet", {}),
    "gla_norm_aware": ("gla", dict(linear_attn_feature_map="norm_aware", linear_attn_normalize=True)),
    # Source-family backbone options: OLMo-2's post norms and whole-projection q/k norm; Gemma 3's zero-centred
    # sandwich norms, embedding scale, score scale and RoPE per layer type.
    "gated_attention_post_norms": ("gated_attention", dict(norm_placement="post", qk_norm=True,
                                                           qk_norm_scope="projection")),
    "gated_attention_gemma_like": ("gated_attention", dict(
        norm_placement="sandwich", norm_weight_offset=1.0, qk_norm=True, embedding_multiplier=5.0,
        query_pre_attn_scalar=12, sliding_window=4, layer_types=["sliding_attention", "full_attention"],
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
                         "full_attention": {"rope_type": "default", "rope_theta": 1e6}})),
    "gated_deltanet_lizard": ("gated_deltanet", dict(linear_attn_hybrid="lizard", sliding_window=3,
                                                     linear_attn_num_sinks=2, full_attention_layers=[1])),
    "moe": ("moe", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)),
    "moe_gdn": ("gated_deltanet", dict(mlp_layer_types=["sparse", "sparse"], num_experts=4, num_experts_per_tok=2,
                                       moe_intermediate_size=32)),
    "sa_softmax": ("sa_softmax", {}),
    "affine_attention": ("affine_attention", {}),
    "move": ("move", dict(move_num_slots=8)),
    "diff_attention": ("diff_attention", dict(diff_attn_noise_heads=2)),
    "diff_attention_sliding": ("diff_attention", dict(diff_attn_noise_heads=2, sliding_window=4,
                                                      layer_types=["sliding_attention", "full_attention"])),
    "cubit": ("cubit", {}),
    "sas": ("sas", {}),
    "geonorm": ("geonorm", {}),
    # Blocks of 4: the 9-token prompts take the sparse prefill path (and Flux's sparse branch has a window).
    "sparse_seer": ("sparse_attention", dict(sparse_attn_method="seer", sparse_attn_block_size=4)),
    "sparse_flux": ("sparse_attention", dict(sparse_attn_method="flux", sparse_attn_block_size=4,
                                             sparse_attn_window_blocks=1)),
    **example_layouts(),  # every variant's own examples (registered with it)
}


def test_every_registered_variant_has_a_layout():
    assert {variant for variant, _ in LAYOUTS.values()} == set(hf_arch.VARIANTS)


def build(name: str):
    variant, extra = LAYOUTS[name]
    torch.manual_seed(0)
    config = hf_arch.get_variant(variant).config_class(**{**TINY, **extra})
    return AutoModelForCausalLM.from_config(config).eval()


def left_padded_batch():
    ids = torch.randint(3, TINY["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    ids[0, :3], mask[0, :3] = TINY["pad_token_id"], 0
    return ids, mask


@pytest.mark.parametrize("name", sorted(LAYOUTS))
@torch.no_grad()
def test_cached_generation_equals_uncached(name):
    model = build(name)
    ids, mask = left_padded_batch()
    for options in (dict(max_new_tokens=8), dict(max_new_tokens=5, num_beams=3)):
        cached = model.generate(ids, attention_mask=mask, do_sample=False, use_cache=True, **options)
        uncached = model.generate(ids, attention_mask=mask, do_sample=False, use_cache=False, **options)
        assert torch.equal(cached, uncached), f"{name} {options}: cached {cached.tolist()} vs {uncached.tolist()}"


@pytest.mark.parametrize("name", ["gated_attention", "gla_full_hybrid", "moe", "diff_attention"])
@torch.no_grad()
def test_cache_under_either_name_continues_the_sequence(name):
    model = build(name)
    ids, mask = left_padded_batch()
    full = model(ids, attention_mask=mask).logits
    for keyword in ("cache", "past_key_values"):
        out = model(ids[:, :6], attention_mask=mask[:, :6], use_cache=True)
        cache = getattr(out, CACHE_OUTPUT_FIELD)
        assert cache is not None
        step = model(ids[:, 6:], attention_mask=mask, use_cache=True, **{keyword: cache}).logits
        torch.testing.assert_close(step, full[:, 6:], rtol=1e-4, atol=1e-4, msg=f"{keyword}=")
    with pytest.raises(ValueError, match="not both"):
        model(ids[:, 6:], cache=cache, past_key_values=type(cache)(config=model.config))


@torch.no_grad()
def test_return_dict_false_gives_tuples_on_base_and_causal_lm():
    model = build("gated_attention")
    ids, _ = left_padded_batch()
    out = model(ids, return_dict=False)
    assert isinstance(out, tuple) and torch.equal(out[0], model(ids).logits)
    base = model.model(ids, return_dict=False)
    assert isinstance(base, tuple) and torch.equal(base[0], model.model(ids).last_hidden_state)


@pytest.mark.parametrize("name", sorted(LAYOUTS))
@torch.no_grad()
def test_fullgraph_compile_claim_is_honest(name):
    """Every model claims `_can_compile_fullgraph` (generate then compiles its forward): a fullgraph trace of the
    prefill and of a cached decode step works and gives the eager logits. The graph is captured, not lowered
    (backend="eager"): lowering is the compiler's business, graph breaks are ours."""
    model = build(name)
    assert model._can_compile_fullgraph, f"{name} lost its fullgraph claim"
    ids, mask = left_padded_batch()
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    eager_prefill = model(ids[:, :-1], attention_mask=mask[:, :-1], use_cache=True)
    prefill = compiled(ids[:, :-1], attention_mask=mask[:, :-1], use_cache=True)
    torch.testing.assert_close(prefill.logits, eager_prefill.logits, rtol=1e-5, atol=1e-5)
    step = compiled(ids[:, -1:], attention_mask=mask, use_cache=True,
                    **{CACHE_OUTPUT_FIELD: getattr(prefill, CACHE_OUTPUT_FIELD)})
    eager_step = model(ids[:, -1:], attention_mask=mask, use_cache=True,
                       **{CACHE_OUTPUT_FIELD: getattr(eager_prefill, CACHE_OUTPUT_FIELD)})
    torch.testing.assert_close(step.logits, eager_step.logits, rtol=1e-5, atol=1e-5)


def _has_linear_layers(model) -> bool:
    return any(t in LINEAR_LAYER_TYPES for t in model.config.layer_types)


@pytest.mark.parametrize("name", sorted(LAYOUTS))
@torch.no_grad()
def test_prompt_lookup_decoding_equals_greedy_or_is_refused_by_name(name):
    """Assisted decoding rolls the cache back after each draft. Attention caches crop exactly; our linear layers keep
    one state per forward, not per token, so their cache says it cannot crop and generate() refuses."""
    model = build(name)
    ids = left_padded_batch()[0][1:]
    if _has_linear_layers(model):
        # transformers >= 5.25 asks the cache whether it can crop; older releases refuse stateful models outright.
        with pytest.raises(ValueError, match="cache that can be cropped|not supported with stateful models"):
            model.generate(ids, max_new_tokens=6, do_sample=False, prompt_lookup_num_tokens=2)
        return
    assisted = model.generate(ids, max_new_tokens=6, do_sample=False, prompt_lookup_num_tokens=2)
    assert torch.equal(assisted, model.generate(ids, max_new_tokens=6, do_sample=False))


@pytest.mark.parametrize("name", sorted(LAYOUTS))
@torch.no_grad()
def test_static_cache_generation_equals_uncached(name):
    model = build(name)
    ids, mask = left_padded_batch()
    static = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, cache_implementation="static")
    assert torch.equal(static, model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                                              use_cache=False))
