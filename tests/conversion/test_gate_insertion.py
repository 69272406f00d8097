"""Gate insertion keeps the source function exactly, for every supported source family."""

import pytest
import torch

import hf_arch
from hf_arch.conversion import GateInsertionOptions, adapter_for, convert_model, insert_gates, max_abs_logit_diff

@pytest.mark.parametrize("granularity", ["headwise", "elementwise"])
def test_converted_logits_equal_source(source_name, granularity, random_source, source_dims):
    source = random_source(source_name)
    target = convert_model(source, granularity=granularity)
    assert target.config.model_type == "hfa_gated_attention"
    ids = torch.randint(0, source_dims["vocab_size"], (2, 40), generator=torch.Generator().manual_seed(1))
    assert max_abs_logit_diff(source, target, ids) <= 1e-5
    # The gates are really there, and really at exactly one.
    gates = [m for m in target.modules() if isinstance(m, hf_arch.layers.AttentionOutputGate)]
    assert len(gates) == source_dims["num_hidden_layers"]
    assert torch.all(gates[0].scores(torch.randn(1, 3, source_dims["hidden_size"])) == 1.0)


def test_padded_batch_and_decode_match_source(random_source, source_dims):
    source = random_source("qwen2")
    target = convert_model(source, granularity="headwise")
    ids = torch.randint(1, source_dims["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding
    a = source(ids, attention_mask=mask).logits
    b = target(ids, attention_mask=mask).logits
    assert (a - b)[mask.bool()].abs().max() <= 1e-5
    gen_kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(source.generate(ids, attention_mask=mask, **gen_kwargs),
                       target.generate(ids, attention_mask=mask, **gen_kwargs))


def test_target_config_is_derived_from_source(random_source, source_dims):
    source = random_source("qwen3")
    config = insert_gates(source, GateInsertionOptions(granularity="headwise", gate_rank=None)).config
    assert config.head_dim == 16 and config.qk_norm and config.attention_bias
    assert config.num_key_value_heads == 2 and config.num_hidden_layers == 3
    qwen2 = insert_gates(random_source("qwen2_sliding_layers")).config
    assert qwen2.layer_types == ["full_attention", "sliding_attention", "sliding_attention"]
    assert qwen2.sliding_window == 8
    assert qwen2.attention_bias and not qwen2.attention_output_bias


def test_low_rank_and_bias_gates_are_identity_and_trainable(random_source, source_dims):
    source = random_source("llama")
    target = convert_model(source, granularity="elementwise", gate_rank=4, gate_bias=True)
    ids = torch.randint(0, source_dims["vocab_size"], (1, 16))
    assert max_abs_logit_diff(source, target, ids) == 0.0
    target.train()
    target(ids, labels=ids).loss.backward()
    grads = [p.grad for n, p in target.named_parameters() if "output_gate" in n and n.endswith("1.weight")]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_normal_gate_init_changes_function(random_source, source_dims):
    source = random_source("llama")
    target = convert_model(source, gate_init="normal")
    ids = torch.randint(0, source_dims["vocab_size"], (1, 16))
    assert max_abs_logit_diff(source, target, ids) > 1e-3


def test_bad_options_and_sources(random_source, source_dims):
    source = random_source("llama")
    with pytest.raises(ValueError, match="gate_init"):
        convert_model(source, gate_init="ones")
    with pytest.raises(ValueError, match="attn_output_gate must be"):
        convert_model(source, granularity="channelwise")
    with pytest.raises(ValueError, match="Unknown option"):
        convert_model(source, window=3)
    with pytest.raises(ValueError, match="Unknown conversion target"):
        convert_model(source, to="mamba")
    from transformers import GPT2Config

    with pytest.raises(ValueError, match="Unsupported source architecture 'gpt2'"):
        adapter_for(GPT2Config())
