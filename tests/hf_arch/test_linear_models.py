"""hfa_gla / hfa_gated_deltanet: decode = full forward, padding never enters a state, beam search, packing, hybrids."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import hf_arch
from hf_arch import GatedDeltaNetConfig, GLAConfig

TINY = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, eos_token_id=1, bos_token_id=2)
LAYOUTS = {
    "gla": (GLAConfig, {}),
    "gla_scalar_gate_rope": (GLAConfig, dict(linear_attn_gate="scalar", linear_attn_use_rope=True)),
    "gated_deltanet": (GatedDeltaNetConfig, {}),
    "gla_ratio_hybrid": (GLAConfig, dict(linear_to_full_ratio=2)),
    "gated_deltanet_sliding_layer": (GatedDeltaNetConfig, dict(layer_types=["linear_attention", "sliding_attention",
                                                                           "linear_attention"], sliding_window=3)),
    "gla_liger": (GLAConfig, dict(linear_attn_hybrid="liger", sliding_window=3, linear_attn_conv_size=3)),
    "gated_deltanet_lizard": (GatedDeltaNetConfig, dict(linear_attn_hybrid="lizard", sliding_window=3,
                                                        linear_attn_num_sinks=2, full_attention_layers=[2])),
    # Linearization options: key-pooled / no gate, softmax / Hedgehog feature maps, normalised branch.
    "gla_key_pooled_softmax_liger": (GLAConfig, dict(linear_attn_gate="key_pooled", linear_attn_feature_map="softmax",
                                                     linear_attn_hybrid="liger", sliding_window=3)),
    "gla_hedgehog_normalized_lizard_sinks": (GLAConfig, dict(linear_attn_gate="none", linear_attn_feature_map="hedgehog",
                                                             linear_attn_normalize=True, linear_attn_hybrid="lizard",
                                                             linear_attn_num_sinks=2, sliding_window=3)),
    # LoLCATs' shared denominator: window softmax mass + linear terms of the keys the window has left.
    "gla_hedgehog_lolcats": (GLAConfig, dict(linear_attn_gate="none", linear_attn_feature_map="hedgehog",
                                             linear_attn_normalize=True, linear_attn_hybrid="lolcats", sliding_window=3,
                                             linear_attn_mix_weights=[0.7, 0.3])),
    # STILL: LoLCATs' denominator plus the salient old tokens kept as softmax keys (NP-Map features).
    "gla_np_map_still": (GLAConfig, dict(linear_attn_gate="scalar", linear_attn_feature_map="np_map",
                                         linear_attn_normalize=True, linear_attn_hybrid="still", sliding_window=4,
                                         linear_attn_selection_block=3, linear_attn_selection_topk=1,
                                         linear_attn_mix_weights=[0.7, 0.3])),
    "gla_hedgehog_key_pooled_normalized": (GLAConfig, dict(linear_attn_gate="key_pooled",
                                                           linear_attn_feature_map="hedgehog",
                                                           linear_attn_normalize=True, linear_attn_conv_size=3)),
    "gated_deltanet_key_pooled": (GatedDeltaNetConfig, dict(linear_attn_gate="key_pooled")),
    "gated_deltanet_key_pooled_hedgehog": (GatedDeltaNetConfig, dict(linear_attn_gate="key_pooled",
                                                                     linear_attn_feature_map="hedgehog")),
}


def build(name: str, seed: int = 0):
    config_class, extra = LAYOUTS[name]
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config_class(**TINY, **extra)).eval()
    with torch.no_grad():  # make sinks, window weight and gates matter
        for param_name, param in model.named_parameters():
            if param_name.endswith(("sink_logits", "window_weight", "window_factor")):
                param.normal_()
            if param_name.endswith("feature_map"):  # Hedgehog maps away from their identity init
                param.add_(0.3 * torch.randn_like(param))
    return model


def ids(B: int, T: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, TINY["vocab_size"], (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", sorted(LAYOUTS))
@torch.no_grad()
def test_chunked_prefill_and_decode_equal_full_forward(name):
    model = build(name)
    x = ids(2, 21)
    full = model(x).logits
    out = model(x[:, :7], use_cache=True)  # prefill
    pieces, cache = [out.logits], out.past_key_values
    out = model(x[:, 7:16], past_key_values=cache, use_cache=True)  # multi-token continuation (chunk path, T > 8)
    pieces.append(out.logits)
    for t in range(16, 21):  # token-by-token decode
        pieces.append(model(x[:, t:t + 1], past_key_values=cache, use_cache=True).logits)
    torch.testing.assert_close(torch.cat(pieces, 1), full, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["gla", "gated_deltanet", "gla_liger", "gated_deltanet_lizard", "gla_ratio_hybrid",
                                  "gla_hedgehog_normalized_lizard_sinks", "gated_deltanet_key_pooled",
                                  "gla_hedgehog_lolcats", "gla_np_map_still"])
@torch.no_grad()
def test_left_padding_equals_unpadded_rows(name):
    model = build(name)
    long, short = ids(1, 12, seed=2)[0], ids(1, 7, seed=3)[0]
    batch = torch.zeros(2, 12, dtype=torch.long)
    mask = torch.zeros(2, 12, dtype=torch.long)
    batch[0], mask[0] = long, 1
    batch[1, 5:], mask[1, 5:] = short, 1
    # Garbage in the padding must not matter either.
    batch[1, :5] = ids(1, 5, seed=4)[0]
    padded = model(batch, attention_mask=mask).logits
    torch.testing.assert_close(padded[0], model(long[None]).logits[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(padded[1, 5:], model(short[None]).logits[0], rtol=1e-4, atol=1e-4)

    # Batch of one, left padded: same as no padding.
    one = model(batch[1:], attention_mask=mask[1:]).logits
    torch.testing.assert_close(one[0, 5:], model(short[None]).logits[0], rtol=1e-4, atol=1e-4)

    # Greedy generation from the padded batch equals each row generated alone.
    generated = model.generate(batch, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    alone = model.generate(short[None], max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert generated[1, 12:].tolist() == alone[0, 7:].tolist()


@pytest.mark.parametrize("name", ["gla", "gated_deltanet", "gated_deltanet_lizard", "gla_hedgehog_lolcats",
                                  "gla_np_map_still"])
@torch.no_grad()
def test_cached_generation_equals_uncached_greedy_and_beam(name):
    model = build(name)
    prompt = ids(2, 6, seed=5)
    kwargs = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
    assert model.generate(prompt, **kwargs).tolist() == model.generate(prompt, use_cache=False, **kwargs).tolist()
    # Beam search reorders the cached states every step; without a cache nothing needs reordering.
    beams = dict(kwargs, num_beams=3, num_return_sequences=2)
    assert model.generate(prompt, **beams).tolist() == model.generate(prompt, use_cache=False, **beams).tolist()


def test_all_linear_cache_reports_its_length():
    model = build("gated_deltanet")
    out = model(ids(1, 9), use_cache=True)
    assert out.past_key_values.get_seq_length() == 9
    assert all(t == "linear_attention" for t in model.config.layer_types)


@pytest.mark.parametrize("name", ["gla", "gated_deltanet", "gla_liger", "gated_deltanet_lizard", "gla_hedgehog_lolcats"])
def test_packed_sequences_equal_padded_batch_with_gradients(name):
    model = build(name).train()
    lengths = [9, 1, 14]
    rows = [ids(1, n, seed=10 + i)[0] for i, n in enumerate(lengths)]
    packed = torch.cat(rows)[None]
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]

    logits_packed = model(packed, position_ids=position_ids).logits[0]
    loss_packed = logits_packed.float().pow(2).mean()
    grads_packed = torch.autograd.grad(loss_packed, list(model.parameters()), allow_unused=True)

    T = max(lengths)
    batch = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, row in enumerate(rows):  # right padding, as a training collator would
        batch[i, : len(row)], mask[i, : len(row)] = row, 1
    logits_padded = model(batch, attention_mask=mask).logits
    real = torch.cat([logits_padded[i, :n] for i, n in enumerate(lengths)])
    torch.testing.assert_close(logits_packed, real, rtol=1e-4, atol=1e-4)
    loss_padded = real.float().pow(2).mean()
    grads_padded = torch.autograd.grad(loss_padded, list(model.parameters()), allow_unused=True)
    for (pname, _), a, b in zip(model.named_parameters(), grads_packed, grads_padded):
        if a is None or b is None:
            assert a is None and b is None, pname
            continue
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5, msg=pname)

    # transformers' flattening collator passes explicit boundaries instead; they win over position_ids.
    cu = torch.tensor([0, 9, 10, 24])
    explicit = model(packed, position_ids=position_ids, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=14,
                     max_length_k=14).logits[0]
    torch.testing.assert_close(explicit, logits_packed, rtol=1e-5, atol=1e-5)


def test_save_load_round_trip_and_auto_classes(tmp_path):
    model = build("gated_deltanet_lizard")
    model.save_pretrained(tmp_path / "m")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert type(loaded) is type(model)
    meta = {"_name_or_path", "transformers_version", "dtype", "torch_dtype", "model_type", "auto_map"}  # saves add auto_map
    fields = lambda c: {k: v for k, v in c.to_dict().items() if k not in meta}  # noqa: E731
    assert fields(loaded.config) == fields(model.config)
    assert loaded.config.layer_types == ["hybrid_sliding", "hybrid_sliding", "full_attention"]
    x = ids(1, 10)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, model(x).logits)


def test_lora_targets_train_only_adapters():
    from peft import LoraConfig, get_peft_model

    model = build("gated_deltanet")
    targets = hf_arch.lora_target_modules(model)
    assert {"q_proj", "o_proj", "output_gate_proj"} <= set(targets)
    peft_model = get_peft_model(model.train(), LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert any(".self_attn.output_gate_proj.lora_A" in n for n in trainable)
    x = ids(2, 12)
    loss = peft_model(input_ids=x, labels=x).loss
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for n, p in peft_model.named_parameters() if p.requires_grad)


def test_trainer_steps_lower_the_loss(tmp_path):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    model = build("gla_ratio_hybrid")
    data = Dataset.from_dict({"input_ids": ids(16, 16, seed=7).tolist()}).map(lambda r: {"labels": r["input_ids"]})
    x = torch.tensor(data["input_ids"][:4])
    with torch.no_grad():
        before = model(input_ids=x, labels=x).loss.item()
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=12, per_device_train_batch_size=4, learning_rate=3e-3,
                             report_to=[], save_strategy="no", logging_steps=100, use_cpu=True, disable_tqdm=True)
    Trainer(model=model, args=args, train_dataset=data).train()
    with torch.no_grad():
        after = model.eval()(input_ids=x, labels=x).loss.item()
    assert after < before - 0.05, (before, after)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(full_attention_layers=[0, 7]), r"names layers \[7\] that do not exist"),
        (dict(linear_to_full_ratio=0), "linear_to_full_ratio must be an integer >= 1"),
        (dict(linear_to_full_ratio=2, full_attention_layers=[1]), "give only one of"),
        (dict(linear_attn_hybrid="liger"), "needs a positive sliding_window"),
        (dict(layer_types=["hybrid_sliding"] * 3, sliding_window=4), "linear_attn_hybrid is 'none'"),
        (dict(linear_attn_gate="full"), "linear_attn_gate must be one of"),
        (dict(linear_attn_num_sinks=2), "applies to linear_attn_hybrid='lizard' only"),
        (dict(linear_attn_mix_weights=[1.0]), "linear_attn_mix_weights"),
        (dict(linear_attn_type="gated_deltanet"), "GLAConfig.linear_attn_type must be 'gla'"),
    ],
)
def test_config_rejects_bad_layouts_and_fields(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GLAConfig(**TINY, **kwargs)


def test_ratio_shorthand_places_full_attention_like_qwen3_next():
    config = GatedDeltaNetConfig(**dict(TINY, num_hidden_layers=8), linear_to_full_ratio=3)
    assert config.layer_types == ["linear_attention"] * 3 + ["full_attention"] + ["linear_attention"] * 3 + ["full_attention"]
    assert config.linear_to_full_ratio is None  # folded into layer_types, which is what gets saved
