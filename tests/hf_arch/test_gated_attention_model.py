"""The gated-attention variant as a transformers model: Auto classes, cache, backends, training hooks, save/load."""

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification, DynamicCache

import hf_arch
from hf_arch.diagnostics import attention_diagnostics


def _ids(batch=2, length=12, vocab=128, seed=0):
    return torch.randint(1, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_registered_with_auto_classes(tiny_gated_config):
    assert isinstance(AutoConfig.for_model("hfa_gated_attention"), hf_arch.GatedAttentionConfig)
    assert type(AutoModel.from_config(tiny_gated_config)).__name__ == "GatedAttentionModel"
    assert isinstance(AutoModelForCausalLM.from_config(tiny_gated_config), hf_arch.GatedAttentionForCausalLM)
    clf = AutoModelForSequenceClassification.from_config(tiny_gated_config)
    tiny_gated_config.pad_token_id = 0
    out = clf(_ids())
    assert out.logits.shape == (2, 2)
    assert "gated_attention" in hf_arch.VARIANTS


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(hidden_size=65, num_attention_heads=4), "not divisible by num_attention_heads"),
        (dict(num_attention_heads=4, num_key_value_heads=3), "multiple of num_key_value_heads"),
        (dict(num_hidden_layers=2, layer_types=["full_attention"]), "layer_types has 1 entries"),
        (dict(num_hidden_layers=1, layer_types=["chunked_attention"]), "unsupported entries"),
        (dict(num_hidden_layers=1, layer_types=["sliding_attention"]), "sliding_window"),
        (dict(attn_output_gate="channelwise"), "attn_output_gate must be"),
        (dict(attn_output_gate=None), "attn_output_gate must be"),
        (dict(attn_output_gate_rank=0), "attn_output_gate_rank"),
        (dict(attn_output_gate_scale=-1.0), "attn_output_gate_scale"),
        (dict(vocab_size=0), "vocab_size must be a positive integer"),
    ],
)
def test_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        hf_arch.GatedAttentionConfig(**kwargs)


@pytest.mark.parametrize("granularity", ["headwise", "elementwise"])
def test_gate_changes_output_and_is_query_dependent(tiny_gated_config, granularity):
    tiny_gated_config.attn_output_gate = granularity
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_gated_config).eval()
    gate = model.model.layers[0].self_attn.output_gate
    scores = gate.scores(torch.randn(1, 5, tiny_gated_config.hidden_size))
    width = 4 if granularity == "headwise" else 4 * tiny_gated_config.head_dim
    assert scores.shape == (1, 5, width)
    assert scores.std(dim=1).min() > 0  # differs across query positions
    before = model(_ids()).logits
    with torch.no_grad():
        gate.proj.weight.zero_()
    assert not torch.allclose(before, model(_ids()).logits)


@pytest.mark.parametrize("layer_types", [None, ["sliding_attention", "full_attention"]])
def test_incremental_decode_matches_full_forward(tiny_gated_config, layer_types):
    if layer_types:
        tiny_gated_config.layer_types = layer_types
        tiny_gated_config.sliding_window = 5
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_gated_config).eval()
    ids = _ids(length=16)
    full = model(ids).logits
    cache = DynamicCache(config=model.config)
    # prefill 6 tokens, continue with a 4-token chunk, then decode one token at a time
    pieces = [model(ids[:, :6], past_key_values=cache, use_cache=True).logits]
    pieces.append(model(ids[:, 6:10], past_key_values=cache, use_cache=True).logits)
    for t in range(10, 16):
        pieces.append(model(ids[:, t : t + 1], past_key_values=cache, use_cache=True).logits)
    assert torch.allclose(torch.cat(pieces, dim=1), full, atol=1e-5)


def test_generate_with_cache_matches_greedy_without(tiny_gated_model):
    ids = _ids(batch=1, length=5)
    with_cache = tiny_gated_model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
    without = tiny_gated_model.generate(ids, max_new_tokens=8, do_sample=False, use_cache=False, pad_token_id=0)
    assert torch.equal(with_cache, without)
    # and greedy = argmax of the full forward at each step
    logits = tiny_gated_model(with_cache[:, :-1]).logits
    assert torch.equal(logits[:, 4:].argmax(-1), with_cache[:, 5:])


def test_attention_backends_agree(tiny_gated_config):
    torch.manual_seed(0)
    ids = _ids()
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    outputs = {}
    for implementation in ("eager", "sdpa", "flex_attention"):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(tiny_gated_config, attn_implementation=implementation).eval()
        assert model.config._attn_implementation == implementation
        try:
            with torch.no_grad():  # flex_attention has no CPU backward
                outputs[implementation] = model(ids, attention_mask=mask).logits
        except Exception as error:  # flex_attention needs a compiler toolchain on some CPUs
            if implementation == "flex_attention":
                pytest.skip(f"flex_attention unavailable here: {error}")
            raise
    valid = mask.bool()
    for name in ("sdpa", "flex_attention"):
        if name in outputs:
            assert torch.allclose(outputs[name][valid], outputs["eager"][valid], atol=1e-5), name


def test_set_attn_implementation_switches_backend(tiny_gated_model):
    ids = _ids()
    eager = tiny_gated_model(ids).logits
    tiny_gated_model.set_attn_implementation("sdpa")
    assert tiny_gated_model.config._attn_implementation == "sdpa"
    assert torch.allclose(tiny_gated_model(ids).logits, eager, atol=1e-5)


def test_gradient_checkpointing_gives_same_gradients(tiny_gated_model):
    ids = _ids()
    tiny_gated_model.train()
    tiny_gated_model(ids, labels=ids).loss.backward()
    reference = {n: p.grad.clone() for n, p in tiny_gated_model.named_parameters()}
    tiny_gated_model.zero_grad()
    tiny_gated_model.gradient_checkpointing_enable()
    tiny_gated_model(ids, labels=ids).loss.backward()
    for name, param in tiny_gated_model.named_parameters():
        assert torch.allclose(param.grad, reference[name], atol=1e-6), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_save_load_roundtrip(tiny_gated_model, tmp_path, dtype):
    model = tiny_gated_model.to(dtype)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=dtype).eval()
    assert loaded.dtype == dtype
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    ids = _ids()
    # Weights are bit-identical; `.to(bf16)` also rounds the RoPE frequency buffer, hence a tolerance for bf16.
    assert torch.allclose(model(ids).logits.float(), loaded(ids).logits.float(), atol=0 if dtype == torch.float32 else 0.1)


def test_peft_lora_targets_every_projection(tiny_gated_model):
    from peft import LoraConfig, get_peft_model

    targets = hf_arch.lora_target_modules(tiny_gated_model)
    assert "output_gate.proj" in targets and "q_proj" in targets
    peft_model = get_peft_model(tiny_gated_model, LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert any("output_gate.proj.lora_A" in n for n in trainable)
    ids = _ids()
    loss = peft_model(ids, labels=ids).loss
    loss.backward()
    assert all(p.grad is not None for n, p in peft_model.named_parameters() if p.requires_grad)


def test_diagnostics_report_sink_and_gate_statistics(tiny_gated_model):
    ids = _ids(length=10)
    diag = attention_diagnostics(tiny_gated_model, ids)
    assert len(diag["sink_share_per_layer"]) == 2
    assert 0.0 < diag["sink_share"] < 1.0
    assert 0.0 < diag["gate_mean"] < 1.0
    hist = diag["gate_histogram"]
    assert sum(hist["counts"]) == 2 * ids.numel() * 4 * tiny_gated_model.config.head_dim  # layers × tokens × channels
    assert tiny_gated_model.config._attn_implementation == "sdpa"  # restored (from_config default)


def test_diagnostics_identity_gates_and_sink_reference(tiny_gated_config):
    tiny_gated_config.attn_output_gate_init = "zeros"
    tiny_gated_config.attn_output_gate_scale = 2.0
    model = AutoModelForCausalLM.from_config(tiny_gated_config, attn_implementation="sdpa").eval()
    ids = _ids(batch=1, length=6)
    diag = attention_diagnostics(model, ids)
    assert diag["gate_mean"] == 1.0
    assert model.config._attn_implementation == "sdpa"
    # independent sink share from eager attention probabilities
    model.config._attn_implementation = "eager"
    probs = model(ids, output_attentions=True).attentions
    expected = sum(p[0, :, 1:, 0].mean().item() for p in probs) / len(probs)
    assert diag["sink_share"] == pytest.approx(expected, rel=1e-5)


def test_loading_never_reinitialises_trained_gates(tiny_gated_config, tmp_path):
    tiny_gated_config.attn_output_gate_init = "zeros"
    tiny_gated_config.attn_output_gate_scale = 2.0
    model = AutoModelForCausalLM.from_config(tiny_gated_config)
    gate = model.model.layers[0].self_attn.output_gate.proj.weight
    assert gate.abs().max() == 0  # identity init from the config
    with torch.no_grad():
        gate.normal_()  # pretend training moved it
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(loaded.model.layers[0].self_attn.output_gate.proj.weight, gate)


def test_config_equality_sees_variant_fields():
    a = hf_arch.GatedAttentionConfig(attn_output_gate_rank=8)
    assert a == hf_arch.GatedAttentionConfig(attn_output_gate_rank=8)
    assert a != hf_arch.GatedAttentionConfig(attn_output_gate_rank=None)
