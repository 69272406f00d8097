"""``--to kda --method mamba_init``: every source tensor copied into Kimi Delta Attention layers, kept layers exact,
attention transfer reproduces the source and its MSE trains down (stage 1 of the linearization recipes)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from hf_arch.conversion import convert_model
from hf_arch.conversion.linearize import LinearizeOptions, linearize
from hf_arch.layers.kimi_delta_attention import KimiDeltaAttention
from hf_arch.peft_utils import new_parameter_names


def _ids(batch: int = 2, length: int = 24, vocab: int = 96, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def _assert_source_copied(source, target):
    target_state = target.state_dict()
    for name, tensor in source.state_dict().items():
        assert torch.equal(target_state[name], tensor), name


# Not mistral_window: the attention-transfer teacher attends the whole causal prefix (as the GLA / Gated DeltaNet
# layers' does), exact for a windowed source only up to its window (Mistral v0.1: 4096 tokens).
@pytest.mark.parametrize("family", ["llama", "llama_bias_tied", "llama3_rope", "qwen2", "qwen3"])
def test_sources_convert_to_kda_and_attention_transfer_reproduces_them(random_source, family):
    source = random_source(family)
    target = convert_model(source, to="kda", keep_full_attention=[1])
    assert target.config.model_type == "hfa_kda"
    assert [type(layer.self_attn).__name__ for layer in target.model.layers] == [
        "KimiDeltaAttention", "HfArchAttention", "KimiDeltaAttention"]
    _assert_source_copied(source, target)
    # What KDA adds, and nothing else, is new (q/k/v/o and a Qwen3 source's q/k norms are copied).
    added = {name.split("self_attn.", 1)[1].split(".")[0] for name in new_parameter_names(target)}
    assert added == set(KimiDeltaAttention.new_parameters)
    layer = target.model.layers[0].self_attn
    assert 1 <= layer.A_log.exp().min() and layer.A_log.exp().max() <= 16
    dt = torch.nn.functional.softplus(layer.dt_bias)
    assert dt.min() >= 1e-4 - 1e-7 and dt.max() <= 0.1 + 1e-6
    x = _ids()
    with torch.no_grad():
        out = target(x, use_cache=False, attention_transfer=True)
        torch.testing.assert_close(out.logits, source(x).logits, rtol=0, atol=1e-5)
        assert len(out.transfer_losses) == 2 and all(torch.isfinite(loss) for loss in out.transfer_losses)
        assert torch.isfinite(target(x).logits).all()
    generated = target.generate(x[:, :4], max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=0)
    assert generated.shape == (2, 7)


def test_kda_target_needs_its_own_method():
    with pytest.raises(ValueError, match=r"--to kda takes --method mamba_init, not 'liger'"):
        convert_model(None, to="kda", method="liger")
    assert LinearizeOptions(method="mamba_init").target() == "gated_deltanet"  # the built-in target stays first
    assert LinearizeOptions(method="mamba_init").target("kda") == "kda"


def test_attention_transfer_training_lowers_the_kda_mse(random_source):
    """LoLCATs-style stage 1 on the converted model: train only what KDA added on the layers' transfer losses."""
    source = random_source("llama")
    target = linearize(source, LinearizeOptions(method="mamba_init"), to="kda")
    x = _ids(batch=4, length=32, seed=1)

    def mean_mse():
        with torch.no_grad():
            return torch.stack(target(x, use_cache=False, attention_transfer=True).transfer_losses).mean().item()

    before = mean_mse()
    new = set(new_parameter_names(target))
    for name, param in target.named_parameters():
        param.requires_grad_(name in new)
    optimizer = torch.optim.Adam([p for p in target.parameters() if p.requires_grad], lr=1e-2)
    target.train()
    for _ in range(25):
        optimizer.zero_grad()
        torch.stack(target(x, use_cache=False, attention_transfer=True).transfer_losses).mean().backward()
        optimizer.step()
    target.eval()
    after = mean_mse()
    print(f"KDA attention-transfer MSE before {before:.4g} after {after:.4g}")
    assert after < 0.7 * before, (before, after)


def test_converted_kda_checkpoint_round_trips(random_source, tmp_path):
    source = random_source("qwen2")
    target = convert_model(source, to="kda", ratio=1)
    target.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    x = _ids()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, target(x).logits, rtol=0, atol=1e-6)
    assert loaded.config.layer_types == ["linear_attention", "full_attention", "linear_attention"]
