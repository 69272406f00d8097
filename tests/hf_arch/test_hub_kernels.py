"""hf_arch.use_kernels(): our CPU gated-delta-rule and KDA kernels behind transformers' own kernel hooks, for its
built-in Qwen3-Next, Qwen3.5, OLMo-hybrid and Kimi Linear models. The kernelized model must give its fallback's
logits and gradients (fp32, ≤ 1e-5) and the same cached generation, and our kernels must really be the ones run."""

from __future__ import annotations

import copy

import pytest
import torch

import hf_arch
from hf_arch import hub_kernels

pytest.importorskip("kernels", reason="transformers' kernel hooks need the `kernels` library")
from transformers.utils import is_kernels_available  # noqa: E402

if not is_kernels_available():
    pytest.skip("the installed `kernels` is outside transformers' supported range", allow_module_level=True)

VOCAB = 96


def _qwen3_next():
    from transformers import Qwen3NextConfig, Qwen3NextForCausalLM

    return Qwen3NextForCausalLM(Qwen3NextConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2,
        linear_num_value_heads=4, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
        shared_expert_intermediate_size=32, layer_types=["linear_attention", "full_attention"]))


def _qwen3_5():
    from transformers import Qwen3_5ForCausalLM, Qwen3_5TextConfig

    return Qwen3_5ForCausalLM(Qwen3_5TextConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2,
        linear_num_value_heads=4, layer_types=["linear_attention", "full_attention"]))


def _olmo_hybrid():
    from transformers import OlmoHybridConfig, OlmoHybridForCausalLM

    return OlmoHybridForCausalLM(OlmoHybridConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2,
        linear_num_value_heads=4, layer_types=["linear_attention", "full_attention"], pad_token_id=0, bos_token_id=1,
        eos_token_id=2))


def _kimi_linear():
    from transformers import KimiLinearConfig, KimiLinearForCausalLM

    return KimiLinearForCausalLM(KimiLinearConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8,
        qk_nope_head_dim=16, v_head_dim=16, num_experts_per_tok=2, num_local_experts=4, n_shared_experts=1,
        linear_head_dim=16, linear_num_heads=4, layer_types=["linear_attention", "full_attention"],
        mlp_layer_types=["dense", "sparse"], pad_token_id=0, bos_token_id=1, eos_token_id=2))


BUILDERS = {"qwen3_next": _qwen3_next, "qwen3_5": _qwen3_5, "olmo_hybrid": _olmo_hybrid, "kimi_linear": _kimi_linear}


def _pair(name):
    torch.manual_seed(0)
    fallback = BUILDERS[name]().float()
    ours = copy.deepcopy(fallback)
    return fallback, ours


def _spy(monkeypatch):
    """Counts calls of our kernels (the kernelized layers look them up in hub_kernels.KERNELS at every call)."""
    calls = []
    for name, real in list(hub_kernels.KERNELS.items()):

        def counted(*args, _real=real, _name=name, **kwargs):
            calls.append(_name)
            return _real(*args, **kwargs)

        monkeypatch.setitem(hub_kernels.KERNELS, name, counted)
    return calls


@pytest.mark.parametrize("name", list(BUILDERS))
def test_logits_and_gradients_equal_the_fallback(name, monkeypatch):
    fallback, ours = _pair(name)
    fallback.train(), ours.train()
    hf_arch.use_kernels(ours)
    repos = {str(f.repo) for f in __import__("kernels").get_kernelized_layers(ours).funcs.values()}
    assert any("hf_arch" in r for r in repos), repos
    calls = _spy(monkeypatch)

    ids = torch.randint(0, VOCAB, (2, 150), generator=torch.Generator().manual_seed(1))  # 3 chunks, the last short
    losses = []
    for model in (fallback, ours):
        out = model(ids, labels=ids)
        out.loss.backward()
        losses.append(out)
    assert calls and all(c.startswith("chunk_") for c in calls)  # only the kernelized model reached our kernels
    torch.testing.assert_close(losses[1].logits, losses[0].logits, rtol=0, atol=1e-5)
    for (pname, p_ref), p_ours in zip(fallback.named_parameters(), ours.parameters()):
        if p_ref.grad is None:
            assert p_ours.grad is None, pname
            continue
        torch.testing.assert_close(p_ours.grad, p_ref.grad, rtol=1e-4, atol=1e-5, msg=pname)


@pytest.mark.parametrize("name", list(BUILDERS))
def test_cached_generation_equals_the_fallback(name, monkeypatch):
    fallback, ours = _pair(name)
    fallback.eval(), ours.eval()
    hf_arch.use_kernels(ours)
    calls = _spy(monkeypatch)
    ids = torch.randint(0, VOCAB, (1, 70), generator=torch.Generator().manual_seed(2))
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    reference = fallback.generate(ids, **kwargs)
    generated = ours.generate(ids, **kwargs)
    assert torch.equal(generated, reference)
    assert any(c.startswith("fused_recurrent_") for c in calls)  # decode steps ran our one-step kernels


def test_registration_alone_lets_from_pretrained_kernelize(tmp_path):
    from transformers import AutoModelForCausalLM

    fallback, _ = _pair("qwen3_next")
    fallback.save_pretrained(tmp_path)
    hf_arch.use_kernels()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, use_kernels=True)
    repos = {str(f.repo) for f in __import__("kernels").get_kernelized_layers(loaded).funcs.values()}
    assert repos == {"hf_arch.hub_kernels (chunk_gated_delta_rule)",
                     "hf_arch.hub_kernels (fused_recurrent_gated_delta_rule)"}


def test_bad_input():
    with pytest.raises(TypeError, match="PreTrainedModel"):
        hf_arch.use_kernels(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="no hf-arch kernel named 'chunk_gla'"):
        hub_kernels.HfArchKernelRepository("chunk_gla")
