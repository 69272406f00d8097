"""Multi-head Latent Attention: the same function as transformers' MLA layers with the same weights (Kimi Linear's NoPE
``KimiLinearAttention``; ``DeepseekV3Attention`` with ``rope_interleave=False``, our rotate_half layout; and
``DeepseekV2Attention``, complex / interleaved RoPE, through the de-interleaving permutation of the rope rows), decode
from a cache of latents against the full forward, and the bad options."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.cache_utils import DynamicCache, StaticCache

from hf_arch.configuration import HfArchConfig
from hf_arch.layers.latent_attention import MLAOptions, MultiHeadLatentAttention
from hf_arch.layers.mixer_registry import mixer_options
from hf_arch.layers.rope import HfArchRotaryEmbedding

HEADS, HIDDEN, ROPE = 4, 32, 8
SHAPES = dict(kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=ROPE, v_head_dim=12)  # q/k dim 16 ≠ v dim 12
REFERENCE_SIZES = dict(vocab_size=32, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=HEADS, num_key_value_heads=HEADS, pad_token_id=None, bos_token_id=None,
                       eos_token_id=None, attn_implementation="eager")


def hf_arch_config(implementation="eager", head_dim=ROPE, **mla):
    config = HfArchConfig(vocab_size=32, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=1,
                          num_attention_heads=HEADS, num_key_value_heads=HEADS, head_dim=head_dim,
                          attn_implementation=implementation)
    config.token_mixer_types = ["mla"]  # set after construction: the config itself validates options eagerly
    config.mixer_options = {"mla": {**SHAPES, **mla}}
    return config


def randomize_(module: nn.Module) -> nn.Module:
    """Every parameter random (norm weights around 1), so each one shows up in the comparison."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            parameter.copy_(torch.randn_like(parameter) * 0.2 + (1.0 if "layernorm" in name else 0.0))
    return module


def causal(query_length: int, key_length: int | None = None, offset: int = 0) -> torch.Tensor:
    """Additive ``[1, 1, q, k]`` mask: query i (at position offset + i) sees keys 0 … offset + i."""
    key_length = query_length if key_length is None else key_length
    future = torch.arange(key_length)[None] > (torch.arange(query_length)[:, None] + offset)
    return torch.zeros(query_length, key_length).masked_fill(future, float("-inf"))[None, None]


def rope_tables(config, length: int, start: int = 0, batch: int = 2):
    positions = torch.arange(start, start + length)[None].expand(batch, -1)
    return HfArchRotaryEmbedding(config)(torch.zeros(1), positions)


def ours_from(reference: nn.Module, implementation="eager", attention_bias=False, **mla) -> MultiHeadLatentAttention:
    config = hf_arch_config(implementation, **mla)
    config.attention_bias = attention_bias
    layer = MultiHeadLatentAttention(config, layer_idx=0)
    layer.load_state_dict(reference.state_dict())  # strict: the module names are transformers', key for key
    return layer.eval()


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("q_lora_rank,bias", [(None, False), (12, True)])
def test_nope_matches_kimi_linear_attention(implementation, q_lora_rank, bias):
    kimi = pytest.importorskip("transformers.models.kimi_linear.modeling_kimi_linear")
    from transformers import KimiLinearConfig

    reference_config = KimiLinearConfig(**REFERENCE_SIZES, q_lora_rank=q_lora_rank, attention_bias=bias, **SHAPES)
    reference = randomize_(kimi.KimiLinearAttention(reference_config, layer_idx=0)).eval()
    # Kimi's latent norms use eps 1e-6 (hard-coded there), HfArchConfig's default rms_norm_eps.
    ours = ours_from(reference, implementation, attention_bias=bias, q_lora_rank=q_lora_rank)

    torch.manual_seed(0)
    hidden = torch.randn(2, 7, HIDDEN, requires_grad=True)
    mask = causal(7)
    expected, expected_weights = reference(hidden, attention_mask=mask)
    out, weights = ours(hidden, rope_tables(ours.config, 7), attention_mask=mask)  # NoPE: cos/sin are not read
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    if implementation == "eager":
        torch.testing.assert_close(weights, expected_weights, rtol=1e-5, atol=1e-5)
    else:
        assert weights is None
    probe = torch.randn_like(out)
    names = [name for name, _ in reference.named_parameters()]
    ours_parameters, reference_parameters = dict(ours.named_parameters()), dict(reference.named_parameters())
    got = torch.autograd.grad((out * probe).sum(), [hidden, *(ours_parameters[n] for n in names)])
    want = torch.autograd.grad((expected * probe).sum(), [hidden, *(reference_parameters[n] for n in names)])
    for name, g, w in zip(["hidden", *names], got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("q_lora_rank", [None, 12])
def test_rope_matches_deepseek_v3_attention_without_interleave(q_lora_rank):
    deepseek = pytest.importorskip("transformers.models.deepseek_v3.modeling_deepseek_v3")
    from transformers import DeepseekV3Config

    reference_config = DeepseekV3Config(**REFERENCE_SIZES, q_lora_rank=q_lora_rank, rope_interleave=False, **SHAPES)
    reference = randomize_(deepseek.DeepseekV3Attention(reference_config, layer_idx=0)).eval()
    ours = ours_from(reference, q_lora_rank=q_lora_rank, use_rope=True)

    torch.manual_seed(0)
    hidden = torch.randn(2, 7, HIDDEN)
    cos_sin = rope_tables(ours.config, 7, start=3)  # the backbone's table, at positions 3…9
    with torch.no_grad():
        expected, expected_weights = reference(hidden, cos_sin, causal(7))
        out, weights = ours(hidden, cos_sin, attention_mask=causal(7))
        nope, _ = ours_from(reference, q_lora_rank=q_lora_rank)(hidden, cos_sin, attention_mask=causal(7))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(weights, expected_weights, rtol=1e-5, atol=1e-5)
    assert (nope - out).abs().max() > 1e-3  # RoPE is applied


def test_rope_matches_deepseek_v2_attention_through_deinterleaved_rope_rows():
    """DeepSeek-V2 rotates interleaved pairs (x0, x1), (x2, x3), … as complex numbers; rotate_half pairs x_i with
    x_{i+D/2}. Permuting q's and k_rot's rope rows to (even…, odd…) turns one into the other, and q·k is unchanged
    by the same permutation of both, so the outputs agree."""
    deepseek = pytest.importorskip("transformers.models.deepseek_v2.modeling_deepseek_v2")
    from transformers import DeepseekV2Config

    reference_config = DeepseekV2Config(**REFERENCE_SIZES, q_lora_rank=12, attention_bias=True, **SHAPES)
    reference = randomize_(deepseek.DeepseekV2Attention(reference_config, layer_idx=0)).eval()
    config = hf_arch_config(q_lora_rank=12, use_rope=True)
    config.attention_bias = True
    ours = MultiHeadLatentAttention(config, layer_idx=0).eval()

    deinterleave = torch.cat([torch.arange(0, ROPE, 2), torch.arange(1, ROPE, 2)])
    nope, rank = SHAPES["qk_nope_head_dim"], SHAPES["kv_lora_rank"]
    state = dict(reference.state_dict())
    q_rows = torch.arange(HEADS * (nope + ROPE)).view(HEADS, nope + ROPE)  # per head: nope rows, then rope rows
    q_rows[:, nope:] = q_rows[:, nope:][:, deinterleave]
    state["q_b_proj.weight"] = state["q_b_proj.weight"][q_rows.flatten()]
    kv_rows = torch.cat([torch.arange(rank), rank + deinterleave])  # latent rows, then k_rot rows
    state["kv_a_proj_with_mqa.weight"] = state["kv_a_proj_with_mqa.weight"][kv_rows]
    state["kv_a_proj_with_mqa.bias"] = state["kv_a_proj_with_mqa.bias"][kv_rows]
    ours.load_state_dict(state)

    torch.manual_seed(0)
    hidden = torch.randn(2, 7, HIDDEN)
    positions = torch.arange(3, 10)[None].expand(2, -1)
    freqs_cis = deepseek.DeepseekV2RotaryEmbedding(reference_config)(hidden, positions)
    with torch.no_grad():
        expected, _ = reference(hidden, attention_mask=causal(7), position_embeddings=freqs_cis)
        out, _ = ours(hidden, rope_tables(config, 7, start=3), attention_mask=causal(7))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("use_rope", [False, True])
@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_cached_decode_matches_full_forward_and_caches_latents(implementation, use_rope):
    config = hf_arch_config(implementation, q_lora_rank=12, use_rope=use_rope)
    torch.manual_seed(0)
    layer = randomize_(MultiHeadLatentAttention(config, layer_idx=0)).eval()
    total, prefill = 7, 4
    hidden = torch.randn(2, total, HIDDEN)
    cos, sin = rope_tables(config, total)
    # eager needs the causal mask; SDPA is causal on its own when there is no mask and more than one query.
    full_mask = causal(total) if implementation == "eager" else None
    with torch.no_grad():
        full, _ = layer(hidden, (cos, sin), attention_mask=full_mask)
        cache = DynamicCache()
        pieces = [layer(hidden[:, :prefill], (cos[:, :prefill], sin[:, :prefill]),
                        attention_mask=causal(prefill) if implementation == "eager" else None,
                        past_key_values=cache)[0]]
        for t in range(prefill, total):  # one query sees every cached position: no mask needed
            step = slice(t, t + 1)
            pieces.append(layer(hidden[:, step], (cos[:, step], sin[:, step]), past_key_values=cache,
                                position_ids=torch.tensor([[t]]), cu_seqlens=None, padding_mask=None)[0])
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-5, atol=1e-5)
    # The cache holds the compressed latents, not per-head keys/values: kv_lora_rank + qk_rope_head_dim per token.
    assert cache.layers[0].keys.shape == (2, 1, total, SHAPES["kv_lora_rank"])
    assert cache.layers[0].values.shape == (2, 1, total, ROPE)
    assert cache.get_seq_length() == total


def test_static_cache_decode_matches_full_forward():
    """A static cache hands back all its slots (zeros past the filled ones): the mask must hide them."""
    config = hf_arch_config("eager", use_rope=True)
    torch.manual_seed(0)
    layer = randomize_(MultiHeadLatentAttention(config, layer_idx=0)).eval()
    total, prefill, slots = 6, 3, 9
    hidden = torch.randn(2, total, HIDDEN)
    cos, sin = rope_tables(config, total)
    with torch.no_grad():
        full, _ = layer(hidden, (cos, sin), attention_mask=causal(total))
        cache = StaticCache(config=config, max_cache_len=slots)
        pieces = [layer(hidden[:, :prefill], (cos[:, :prefill], sin[:, :prefill]),
                        attention_mask=causal(prefill, slots), past_key_values=cache)[0]]
        for t in range(prefill, total):
            step = slice(t, t + 1)
            pieces.append(layer(hidden[:, step], (cos[:, step], sin[:, step]),
                                attention_mask=causal(1, slots, offset=t), past_key_values=cache)[0])
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-5, atol=1e-5)
    assert cache.layers[0].keys.shape == (2, 1, slots, SHAPES["kv_lora_rank"])
    assert cache.layers[0].values.shape == (2, 1, slots, ROPE)


def test_options_from_config_and_module_layout():
    config = hf_arch_config()
    config.mixer_options = None
    assert mixer_options(config, "mla", MLAOptions) == MLAOptions()
    options = mixer_options(hf_arch_config(q_lora_rank=12), "mla", MLAOptions)
    assert options.to_dict() == {**MLAOptions().to_dict(), **SHAPES, "q_lora_rank": 12}
    for q_lora_rank, present in ((None, {"q_proj"}), (12, {"q_a_proj", "q_b_proj"})):
        layer = MultiHeadLatentAttention(hf_arch_config(), 0, MLAOptions(**SHAPES, q_lora_rank=q_lora_rank))
        linears = {name for name, module in layer.named_children() if isinstance(module, nn.Linear)}
        # peft_utils skips the lora_targets a layout lacks; the ones it has are exactly the layer's projections.
        assert linears == {t for t in layer.lora_targets if getattr(layer, t) is not None}
        assert present <= linears
        assert layer.layer_types == ("full_attention",)
        assert layer.num_key_value_groups == 1 and "kv_b_proj" in layer.new_parameters


@pytest.mark.parametrize("field,value", [
    ("kv_lora_rank", 0), ("q_lora_rank", 0), ("qk_nope_head_dim", -1), ("qk_rope_head_dim", 2.5),
    ("v_head_dim", True), ("use_rope", "yes"), ("latent_norm_eps", 0.0),
])
def test_bad_options_raise_naming_the_field(field, value):
    with pytest.raises(ValueError, match=rf"MLAOptions\.{field} must be"):
        MLAOptions(**{field: value})
    with pytest.raises(ValueError, match=rf"MLAOptions\.{field} must be"):
        MultiHeadLatentAttention(hf_arch_config(**{field: value}), 0)


def test_bad_configs_raise():
    with pytest.raises(ValueError, match=r"MLAOptions\.qk_rope_head_dim must be even"):
        MLAOptions(qk_rope_head_dim=7, use_rope=True)
    with pytest.raises(ValueError, match=r"mixer_options\['mla'\] has unknown options \['kv_rank', 'rope'\]; MLAOptions takes \["):
        MultiHeadLatentAttention(hf_arch_config(kv_rank=8, rope=True), 0)
    with pytest.raises(ValueError, match=r"config.head_dim == qk_rope_head_dim .* head_dim=16, qk_rope_head_dim=8"):
        MultiHeadLatentAttention(hf_arch_config(head_dim=16, use_rope=True), 0)
    MultiHeadLatentAttention(hf_arch_config(head_dim=16), 0)  # NoPE does not read the rotary table
    layer = MultiHeadLatentAttention(hf_arch_config(use_rope=True), 0)
    with pytest.raises(ValueError, match="needs position_embeddings"):
        layer(torch.randn(1, 2, HIDDEN))
    layer.config._attn_implementation = "flex_attention"
    with pytest.raises(ValueError, match=r"attn_implementation in \('eager', 'sdpa'\), got 'flex_attention'"):
        layer(torch.randn(1, 2, HIDDEN), rope_tables(layer.config, 2, batch=1))


def test_yarn_mscale_folds_into_the_softmax_scale_like_deepseek():
    """With YaRN's mscale_all_dim, DeepSeek multiplies the whole q·k scale by mscale² (use_rope only)."""
    deepseek = pytest.importorskip("transformers.models.deepseek_v3.modeling_deepseek_v3")
    from transformers import DeepseekV3Config

    yarn = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "mscale_all_dim": 0.7, "mscale": 0.7,
            "original_max_position_embeddings": 512}
    reference = deepseek.DeepseekV3Attention(
        DeepseekV3Config(**REFERENCE_SIZES, q_lora_rank=None, rope_parameters=dict(yarn), **SHAPES), layer_idx=0)
    config = hf_arch_config(use_rope=True)
    config.rope_parameters = dict(yarn)
    assert reference.scaling != (ROPE + SHAPES["qk_nope_head_dim"]) ** -0.5
    assert MultiHeadLatentAttention(config, 0).scaling == pytest.approx(reference.scaling, rel=1e-12)
    nope = hf_arch_config()
    nope.rope_parameters = dict(yarn)
    assert MultiHeadLatentAttention(nope, 0).scaling == (ROPE + SHAPES["qk_nope_head_dim"]) ** -0.5


# --- as a registered token mixer in a model: the Kimi Linear layout's full-attention layer ---------------------------

def kimi_style_config(**overrides):
    import hf_arch

    kwargs = dict(vocab_size=96, hidden_size=HIDDEN, intermediate_size=64, num_attention_heads=HEADS, head_dim=ROPE,
                  num_hidden_layers=4, pad_token_id=0, linear_attn_type="gated_deltanet", linear_attn_conv_size=4,
                  linear_attn_qk_norm="l2", token_mixer_types=["gated_deltanet"] * 3 + ["mla"],
                  mixer_options={"mla": dict(SHAPES)})
    kwargs.update(overrides)
    return hf_arch.HybridConfig(**kwargs)


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_mla_in_a_hybrid_model_decodes_like_the_full_forward(implementation):
    """Greedy tokens with the cache (latents in the MLA layer's entry) equal those without, in a left-padded batch,
    and the padded row equals the row alone; the model refuses flash attention by the mixer's name."""
    import hf_arch

    torch.manual_seed(0)
    model = hf_arch.HybridForCausalLM(kimi_style_config(attn_implementation=implementation)).eval()
    assert model.config.layer_types == ["linear_attention"] * 3 + ["full_attention"]
    assert isinstance(model.model.layers[3].self_attn, MultiHeadLatentAttention)
    ids = torch.randint(1, 96, (2, 8))
    mask = torch.ones_like(ids)
    ids[0, :3], mask[0, :3] = 0, 0
    kwargs = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cached = model.generate(ids, attention_mask=mask, **kwargs)
        uncached = model.generate(ids, attention_mask=mask, use_cache=False, **kwargs)
        alone = model.generate(ids[:1, 3:], attention_mask=mask[:1, 3:], **kwargs)
    assert torch.equal(cached, uncached)
    assert torch.equal(alone[0, 5:], cached[0, 8:])
    assert model.config.attention_kernel_conflicts() == ["token mixer 'mla' runs on the eager, sdpa attention backends only"]
    assert not model._supports_flash_attn


def test_mla_hybrid_saves_loads_and_lists_its_lora_targets(tmp_path):
    import hf_arch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = hf_arch.HybridForCausalLM(kimi_style_config()).eval()
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.mixer_options == {"mla": SHAPES}
    ids = torch.randint(1, 96, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=1e-6)
    assert {"kv_a_proj_with_mqa", "kv_b_proj", "q_proj", "o_proj"} <= set(hf_arch.lora_target_modules(model))
    assert "class MultiHeadLatentAttention" in (tmp_path / "modeling_hf_arch.py").read_text()
