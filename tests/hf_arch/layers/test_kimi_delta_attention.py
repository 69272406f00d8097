"""Kimi Delta Attention (KDA): the same function as transformers' ``KimiLinearDeltaAttention`` with the same weights
(full forward and cached decode; Moonshot's split-conv layout too), cached decode against the full forward (GQA),
left padding, packed sequences, the options' validation, gradients to every parameter, and a tiny hybrid model
(registration, init, LoRA / new-parameter metadata, generation cache)."""

from __future__ import annotations

import inspect
import math

import pytest
import torch
from transformers.cache_utils import DynamicCache

import hf_arch
from hf_arch.layers.kimi_delta_attention import KDAOptions, KimiDeltaAttention, kda_state_dict_from_kimi
from hf_arch.layers.linear_attention import cached_token_count

HIDDEN, HEADS, HEAD_DIM = 32, 4, 8
SIZES = dict(vocab_size=61, hidden_size=HIDDEN, intermediate_size=48, num_attention_heads=HEADS, head_dim=HEAD_DIM)


def kda_config(kv_heads: int = HEADS, layers: int = 1, mixers=None, **options) -> hf_arch.HybridConfig:
    mixers = mixers or ["kda"] * layers
    return hf_arch.HybridConfig(**SIZES, num_hidden_layers=len(mixers), num_key_value_heads=kv_heads,
                                token_mixer_types=mixers, mixer_options={"kda": options} if options else None)


def randomize_(module: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """Every parameter random (norm weights around 1, A_log in a sensible range), so each shows in the comparison."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            if "A_log" in name:
                parameter.copy_(torch.empty_like(parameter).uniform_(0.0, 1.5))
            else:
                parameter.copy_(torch.randn_like(parameter) * 0.3 + (1.0 if "norm" in name else 0.0))
    return module


def kda_layer(seed: int = 1, **kwargs) -> KimiDeltaAttention:
    return randomize_(KimiDeltaAttention(kda_config(**kwargs), layer_idx=0), seed).eval()


def inputs(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.randn(batch, length, HIDDEN)


# -- (a) transformers' KimiLinearDeltaAttention ---------------------------------------------------------------------


def kimi_reference(conv_size: int, rms_norm_eps: float):
    kimi = pytest.importorskip("transformers.models.kimi_linear.modeling_kimi_linear")
    from transformers import KimiLinearConfig

    config = KimiLinearConfig(vocab_size=61, hidden_size=HIDDEN, intermediate_size=48, num_hidden_layers=1,
                              num_attention_heads=HEADS, num_key_value_heads=HEADS, rms_norm_eps=rms_norm_eps,
                              linear_attn_config={"head_dim": HEAD_DIM, "num_heads": HEADS,
                                                  "short_conv_kernel_size": conv_size},
                              pad_token_id=None, bos_token_id=None, eos_token_id=None)
    assert config.layer_types[0] == "linear_attention"
    return config, randomize_(kimi.KimiLinearDeltaAttention(config, layer_idx=0)).eval()


@pytest.fixture
def kimi_torch_paths(monkeypatch):
    """Pin transformers' reference PyTorch paths in its Kimi layer. Its kernel wrappers run fla whenever fla is
    importable, and before 5.25 without looking at the device (fla's Triton kernels then fail on CPU tensors: "0 active
    drivers"); fla-core is in our dev extra. The wrappers keep the torch function as ``__wrapped__``."""
    kimi = pytest.importorskip("transformers.models.kimi_linear.modeling_kimi_linear")
    for name in ("chunk_kimi_delta_attention", "recurrent_kimi_delta_attention", "causal_conv1d_fn",
                 "causal_conv1d_update"):
        fn = getattr(kimi, name, None)
        if fn is not None and hasattr(fn, "__wrapped__"):
            monkeypatch.setattr(kimi, name, fn.__wrapped__)


@pytest.mark.parametrize("length", [5, 11])  # ours: per-token path (<= 8 tokens), chunked path
@torch.no_grad()
@pytest.mark.usefixtures("kimi_torch_paths")
def test_matches_transformers_kimi_linear_delta_attention(length):
    ours = KimiDeltaAttention(kda_config(conv_size=3), layer_idx=0).eval()
    _, reference = kimi_reference(3, ours.config.rms_norm_eps)
    ours.load_state_dict(kda_state_dict_from_kimi(reference.state_dict()))  # strict: every key mapped
    x = inputs(2, length)
    out, weights = ours(x)
    assert weights is None
    torch.testing.assert_close(out, reference(x), rtol=1e-5, atol=1e-5)


@torch.no_grad()
@pytest.mark.usefixtures("kimi_torch_paths")
def test_cached_decode_matches_transformers():
    reference_config, reference = kimi_reference(4, 1e-6)
    ours = KimiDeltaAttention(kda_config(), layer_idx=0).eval()
    ours.load_state_dict(kda_state_dict_from_kimi(reference.state_dict()))
    x = inputs(2, 8)
    theirs_cache, our_cache = DynamicCache(config=reference_config), DynamicCache(config=ours.config)
    # The reference layer's cache argument: cache_params (5.17), past_key_values, cache (5.25; older names ignored).
    parameters = inspect.signature(reference.forward).parameters
    name = next(n for n in ("cache", "cache_params", "past_key_values") if n in parameters)
    for start, stop in ((0, 5), (5, 6), (6, 7), (7, 8)):
        expected = reference(x[:, start:stop], **{name: theirs_cache})
        out, _ = ours(x[:, start:stop], past_key_values=our_cache)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_moonshot_checkpoint_layout_maps_to_the_same_weights():
    """Moonshot's checkpoint (fla): q/k/v_conv1d separately and the decay parameters directly on the layer."""
    _, reference = kimi_reference(4, 1e-6)
    merged = reference.state_dict()
    split = {k.replace("forget_gate.", ""): v for k, v in merged.items() if k != "conv1d.weight"}
    for name, part in zip("qkv", merged["conv1d.weight"].chunk(3, dim=0)):
        split[f"self_attn.{name}_conv1d.weight"] = part
    split = {("self_attn." + k if not k.startswith("self_attn.") else k): v for k, v in split.items()}
    from_split = kda_state_dict_from_kimi(split, prefix="self_attn.")
    from_merged = kda_state_dict_from_kimi(merged)
    assert sorted(from_split) == sorted("self_attn." + k for k in from_merged)
    for key, value in from_merged.items():
        torch.testing.assert_close(from_split["self_attn." + key], value, rtol=0, atol=0)
    assert from_merged["A_log"].shape == (HEADS,) and from_merged["conv.weight"].shape == (3 * HEADS * HEAD_DIM, 4)
    with pytest.raises(ValueError, match="q/k/v_conv1d"):
        kda_state_dict_from_kimi({"q_conv1d.weight": split["self_attn.q_conv1d.weight"]})


# -- (b) cached decode ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("splits", [(5, 6, 7, 8, 9), (3, 6, 7, 9)])  # prefill + single tokens; chunked continuation
@torch.no_grad()
def test_cached_decode_equals_full_forward(splits):
    layer = kda_layer(kv_heads=2)  # GQA: k/v heads repeated to the query heads
    x = inputs(2, splits[-1])
    full, _ = layer(x)
    cache = DynamicCache(config=layer.config)
    pieces, start = [], 0
    for stop in splits:
        pieces.append(layer(x[:, start:stop], past_key_values=cache)[0])
        start = stop
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-5, atol=1e-5)
    assert cached_token_count(cache) == splits[-1]
    state = cache.layers[0].recurrent_states[0]
    assert state.shape == (2, HEADS, HEAD_DIM, HEAD_DIM) and state.dtype == torch.float32


# -- (c) left padding -----------------------------------------------------------------------------------------------


@torch.no_grad()
def test_left_padded_row_equals_unpadded_row_with_and_without_cache():
    layer, pad = kda_layer(), 3
    x = inputs(2, 9)
    x[0, :pad] = torch.randn(pad, HIDDEN) * 5  # padding with large junk: it must not leak anywhere
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[0, :pad] = 0
    alone, _ = layer(x[:1, pad:])
    padded, _ = layer(x, attention_mask=mask)
    torch.testing.assert_close(padded[0, pad:], alone[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(padded[1], layer(x[1:])[0][0], rtol=1e-5, atol=1e-5)

    cache, alone_cache = DynamicCache(config=layer.config), DynamicCache(config=layer.config)
    prefill, _ = layer(x[:, :7], attention_mask=mask[:, :7], past_key_values=cache)
    alone_prefill, _ = layer(x[:1, pad:7], past_key_values=alone_cache)
    torch.testing.assert_close(prefill[0, pad:], alone_prefill[0], rtol=1e-5, atol=1e-5)
    for t in (7, 8):
        step, _ = layer(x[:, t:t + 1], attention_mask=mask[:, :t + 1], past_key_values=cache)
        alone_step, _ = layer(x[:1, t:t + 1], past_key_values=alone_cache)
        torch.testing.assert_close(step[0], alone_step[0], rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_padding_never_enters_the_recurrent_state():
    """Right / middle padding: the conv's taps reach real tokens there, so k, v, decay and β must be cut by the mask."""
    layer = kda_layer()
    x = inputs(2, 8)
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[0, 5:] = 0  # right padding
    mask[1, 2:4] = 0  # a gap
    cache = DynamicCache(config=layer.config)
    layer(x, attention_mask=mask, past_key_values=cache)
    state = cache.layers[0].recurrent_states[0]
    alone = DynamicCache(config=layer.config)
    layer(x[:1, :5], past_key_values=alone)
    torch.testing.assert_close(state[0], alone.layers[0].recurrent_states[0][0], rtol=1e-5, atol=1e-5)
    empty = DynamicCache(config=layer.config)
    layer(x[1:, :2], past_key_values=empty)
    gap_state = empty.layers[0].recurrent_states[0]
    # The gap's tokens leave the state as it was after token 1 (the next real tokens then see zero conv inputs).
    reference = DynamicCache(config=layer.config)
    layer(x[1:, :4], attention_mask=mask[1:, :4], past_key_values=reference)
    torch.testing.assert_close(reference.layers[0].recurrent_states[0], gap_state, rtol=1e-5, atol=1e-5)


# -- (d) packed sequences -------------------------------------------------------------------------------------------


@torch.no_grad()
def test_packed_sequences_equal_separate_rows():
    layer = kda_layer(kv_heads=2)
    lengths = (4, 7, 2)
    rows = [inputs(1, n, seed=i) for i, n in enumerate(lengths)]
    packed = torch.cat(rows, dim=1)
    cu_seqlens = torch.tensor([0, 4, 11, 13])
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    out, _ = layer(packed, cu_seqlens=cu_seqlens, position_in_sequence=positions)
    for row, (start, stop) in zip(rows, zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist())):
        torch.testing.assert_close(out[:, start:stop], layer(row)[0], rtol=1e-5, atol=1e-5)


# -- (e) options ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("options,field", [
    (dict(conv_size=0), "conv_size"),
    (dict(conv_size=True), "conv_size"),
    (dict(decay_low_rank_dim=0), "decay_low_rank_dim"),
    (dict(gate_low_rank_dim=2.5), "gate_low_rank_dim"),
    (dict(use_qk_l2norm=1), "use_qk_l2norm"),
    (dict(gate_activation="relu"), "gate_activation"),
    (dict(gate_lower_bound=0.0), "gate_lower_bound"),
    (dict(gate_lower_bound=float("-inf")), "gate_lower_bound"),
])
def test_bad_options_raise_naming_the_field(options, field):
    with pytest.raises(ValueError, match=rf"KDAOptions\.{field}\b"):
        KDAOptions(**options)
    with pytest.raises(ValueError, match=rf"KDAOptions\.{field}\b"):
        KimiDeltaAttention(kda_config(**options), layer_idx=0)


def test_unknown_option_keys_raise():
    with pytest.raises(ValueError, match=r"unknown options \['conv_width'\]"):
        KimiDeltaAttention(kda_config(conv_width=4), layer_idx=0)


def test_attention_transfer_returns_the_source_attention_and_the_mse_to_it():
    """Stage 1 of the linearization recipes: with attention_transfer the layer returns exactly the softmax attention
    of its own q/k/v/o (a Llama attention layer holding the same weights, RoPE included: the source layer's
    function) and, as its auxiliary transfer_loss, the MSE of its own KDA output to that teacher."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRotaryEmbedding

    layer = kda_layer(kv_heads=2)
    llama_config = LlamaConfig(hidden_size=HIDDEN, num_attention_heads=HEADS, num_key_value_heads=2, head_dim=HEAD_DIM,
                               intermediate_size=48, vocab_size=61, attn_implementation="eager")
    llama = LlamaAttention(llama_config, layer_idx=0).eval()
    llama.load_state_dict({k: v for k, v in layer.state_dict().items() if k.split(".")[0] in
                           ("q_proj", "k_proj", "v_proj", "o_proj")})
    x = inputs(2, 7)
    position_ids = torch.arange(7)[None].expand(2, 7)
    rope = LlamaRotaryEmbedding(llama_config)(x, position_ids)
    causal = torch.full((7, 7), float("-inf")).triu(1)[None, None]
    expected, _ = llama(x, position_embeddings=rope, attention_mask=causal)
    teacher, weights, auxiliary = layer(x, position_embeddings=rope, attention_transfer=True)
    torch.testing.assert_close(teacher, expected, rtol=1e-5, atol=1e-5)
    own, _ = layer(x, position_embeddings=rope)
    assert weights is None and auxiliary["transfer_loss"].requires_grad
    torch.testing.assert_close(auxiliary["transfer_loss"], (own - expected).pow(2).mean(), rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="attention_transfer mode runs without a cache"):
        layer(x, position_embeddings=rope, attention_transfer=True, past_key_values=DynamicCache())


def test_options_shape_the_layer():
    layer = KimiDeltaAttention(kda_config(kv_heads=2, conv_size=2, decay_low_rank_dim=5, gate_low_rank_dim=3,
                                          gate_activation="silu", gate_lower_bound=-5.0), layer_idx=0)
    assert layer.conv.weight.shape == ((HEADS + 2 * 2) * HEAD_DIM, 2)
    assert layer.f_a_proj.weight.shape == (5, HIDDEN) and layer.f_b_proj.weight.shape == (HEADS * HEAD_DIM, 5)
    assert layer.g_a_proj.weight.shape == (3, HIDDEN) and layer.g_b_proj.weight.shape == (HEADS * HEAD_DIM, 3)
    assert layer.k_proj.weight.shape == (2 * HEAD_DIM, HIDDEN) and layer.o_norm.activation == "silu"
    randomize_(layer)
    g = layer.log_decay(inputs(1, 6))
    assert g.shape == (1, 6, HEADS, HEAD_DIM) and g.dtype == torch.float32
    assert bool((g > -5.0).all() and (g < 0).all())  # the safe gate's range


# -- (f) gradients --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("length", [4, 10])
def test_gradients_reach_every_parameter(length):
    layer = kda_layer(kv_heads=2).train()
    x = inputs(2, length).requires_grad_(True)
    mask = torch.ones(2, length, dtype=torch.long)
    mask[0, :2] = 0
    out, _ = layer(x, attention_mask=mask)
    out.square().mean().backward()
    for name, parameter in layer.named_parameters():
        assert parameter.grad is not None, name
        assert torch.isfinite(parameter.grad).all(), name
        assert parameter.grad.abs().sum() > 0, name
    assert x.grad is not None and x.grad[0, :2].abs().sum() == 0  # padded positions influence nothing


# -- a tiny model ---------------------------------------------------------------------------------------------------


def test_in_a_hybrid_model():
    from hf_arch.models.cache_names import CACHE_OUTPUT_FIELD

    config = kda_config(kv_heads=2, mixers=["kda", "attention"])
    assert config.layer_types == ["linear_attention", "full_attention"]
    torch.manual_seed(0)
    model = hf_arch.HybridForCausalLM(config).eval()
    layer = model.model.layers[0].self_attn
    assert isinstance(layer, KimiDeltaAttention)
    A = layer.A_log.detach().exp()
    assert bool(((A >= 1) & (A <= 16)).all())
    dt = torch.nn.functional.softplus(layer.dt_bias.detach())
    assert bool(((dt >= 1e-4 * 0.999) & (dt <= 0.1 * 1.001)).all())
    assert torch.equal(layer.o_norm.weight.detach(), torch.ones(HEAD_DIM))

    new = set(hf_arch.new_parameter_names(model))
    prefix = "model.layers.0.self_attn."
    expected = {prefix + n for n in ("conv.weight", "f_a_proj.weight", "f_b_proj.weight", "A_log", "dt_bias",
                                     "b_proj.weight", "g_a_proj.weight", "g_b_proj.weight", "o_norm.weight")}
    assert expected <= new and not any(n.startswith(prefix) for n in new - expected)
    assert {"q_proj", "k_proj", "v_proj", "o_proj"} <= set(hf_arch.lora_target_modules(model))

    tokens = torch.randint(0, 61, (2, 7))
    with torch.no_grad():
        full = model(tokens).logits
        cache = DynamicCache(config=config)
        first = model(tokens[:, :5], **{CACHE_OUTPUT_FIELD: cache}, use_cache=True).logits
        rest = [model(tokens[:, t:t + 1], **{CACHE_OUTPUT_FIELD: cache}, use_cache=True).logits for t in (5, 6)]
    torch.testing.assert_close(torch.cat([first, *rest], dim=1), full, rtol=1e-4, atol=1e-4)
    assert math.isfinite(full.abs().max().item())


@torch.no_grad()
def test_bf16_layer_keeps_an_fp32_state():
    layer = kda_layer().to(torch.bfloat16)
    x = inputs(2, 6).to(torch.bfloat16)
    full, _ = layer(x)
    cache = DynamicCache(config=layer.config)
    first, _ = layer(x[:, :4], past_key_values=cache)
    rest = [layer(x[:, t:t + 1], past_key_values=cache)[0] for t in (4, 5)]
    assert full.dtype == torch.bfloat16 and cache.layers[0].recurrent_states[0].dtype == torch.float32
    torch.testing.assert_close(torch.cat([first, *rest], dim=1), full, rtol=2e-2, atol=2e-2)
