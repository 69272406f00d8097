"""Every registered variant's examples (``Variant.examples``) through what users do with a model beyond generating:
model-level metadata from the modules built, PEFT LoRA on the declared targets, and a few Trainer steps. (Cached
generation, packed rows, remote code, checkpoint fixtures and transformers' common tests take the examples too.)"""

from __future__ import annotations

import re

import pytest
import torch
from transformers import AutoModelForCausalLM

import hf_arch
from hf_arch.registry import example_layouts

TINY = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0)
EXAMPLES = example_layouts()
# What a Llama-family checkpoint has (a dense FFN also becomes a MoE layer's shared expert): everything else is new.
LLAMA_PARAMETER = re.compile(r"^(model\.embed_tokens|lm_head|model\.norm|model\.layers\.\d+\.(input_layernorm|"
                             r"post_attention_layernorm|self_attn\.(q_proj|k_proj|v_proj|o_proj|q_norm|k_norm)|"
                             r"mlp\.(shared_expert\.)?(gate_proj|up_proj|down_proj)))\.")


def build(key: str):
    variant, fields = EXAMPLES[key]
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(hf_arch.get_variant(variant).config_class(**{**TINY, **fields}))


def ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, TINY["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(seed))


def test_examples_exist_for_the_new_variants():
    assert {variant for variant, _ in EXAMPLES.values()} >= {"hybrid", "kda"}


@pytest.mark.parametrize("key", sorted(EXAMPLES))
def test_metadata_is_the_union_of_the_modules_built(key):
    model = build(key)
    new = set(hf_arch.new_parameter_names(model))
    for name, _ in model.named_parameters():  # every parameter is a Llama one or declared new, never both
        assert bool(LLAMA_PARAMETER.match(name)) != (name in new), name
    linears = [n for n, module in model.named_modules() if isinstance(module, torch.nn.Linear)]
    for target in hf_arch.lora_target_modules(model):
        matched = [n for n in linears if n == target or n.endswith("." + target)]
        assert matched and "lm_head" not in matched, target
    assert hf_arch.lora_target_modules(model.config) == hf_arch.lora_target_modules(model)


@pytest.mark.parametrize("key", sorted(EXAMPLES))
def test_lora_trains_only_adapters(key):
    from peft import LoraConfig, get_peft_model

    model = build(key).train()
    modules = hf_arch.lora_target_modules(model, include_new=False)
    # A variant with no Llama linear (TokenFormer: every projection is parameter tokens) adapts its parameters.
    parameters = [] if modules else hf_arch.lora_target_parameters(model)
    assert modules or parameters, "a variant must offer LoRA something to adapt"
    peft_model = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=modules,
                                                  target_parameters=parameters or None))
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    x = ids(2, 12)
    loss = peft_model(input_ids=x, labels=x).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in peft_model.parameters() if p.requires_grad)


@pytest.mark.parametrize("key", sorted(EXAMPLES))
def test_trainer_steps_lower_the_loss(key, tmp_path):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    model = build(key)
    data = Dataset.from_dict({"input_ids": ids(16, 16, seed=7).tolist()}).map(lambda r: {"labels": r["input_ids"]})
    x = torch.tensor(data["input_ids"][:4])
    with torch.no_grad():
        before = model(input_ids=x, labels=x).loss.item()
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=10, per_device_train_batch_size=4, learning_rate=3e-3,
                             report_to=[], save_strategy="no", logging_steps=100, use_cpu=True, disable_tqdm=True)
    Trainer(model=model, args=args, train_dataset=data).train()
    model.eval()
    with torch.no_grad():
        after = model(input_ids=x, labels=x).loss.item()
    assert after < before, (before, after)
