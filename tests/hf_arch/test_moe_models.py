"""hfa_moe: presets decode like the full forward, the UniPool pool is one shared tensor, aux losses reach the loss,
Trainer / PEFT (target_parameters) / accelerate / save-load work, bad configs fail at config time."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import hf_arch
from hf_arch import MoEConfig
from hf_arch.layers.moe_losses import moe_auxiliary_losses
from hf_arch.layers.moe_router import selected_mask
from hf_arch.models.moe_presets import MOE_PRESETS

TINY = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, eos_token_id=1, bos_token_id=2,
            moe_intermediate_size=16)
LAYOUTS = {
    **{preset: dict(moe_preset=preset) for preset in MOE_PRESETS},
    "step_with_gla_and_shared_expert": dict(moe_sparse_step=2, num_shared_experts=1, layer_types=[
        "linear_attention", "full_attention", "linear_attention"]),
    "sigmoid_topk_unnormalised": dict(moe_router="sigmoid_topk", moe_norm_topk_prob=False, num_experts_per_tok=3),
    "dense_to_sparse": dict(moe_router="activation_dense_to_sparse", moe_router_temperature=0.5),
    "sqrt_gate": dict(moe_router="sqrt_gate", num_experts_per_tok=3),
    "dynamic_threshold_descending": dict(moe_router="dynamic_topk", num_experts_per_tok=4,
                                         moe_capacity_schedule="descending", moe_capacity_min=2),
    "dynamic_complexity": dict(moe_router="dynamic_topk", moe_dynamic_k="complexity", num_experts_per_tok=3),
}


def build(name: str, seed: int = 0, **extra):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(MoEConfig(**TINY, **LAYOUTS[name], **extra)).eval()


def ids(B: int, T: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, TINY["vocab_size"], (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", sorted(LAYOUTS))
@torch.no_grad()
def test_prefill_then_decode_equals_full_forward(name):
    model = build(name)
    x = ids(2, 14)
    full = model(x).logits
    out = model(x[:, :6], use_cache=True)
    pieces, cache = [out.logits], out.past_key_values
    pieces.append(model(x[:, 6:10], past_key_values=cache, use_cache=True).logits)
    for t in range(10, 14):
        pieces.append(model(x[:, t:t + 1], past_key_values=cache, use_cache=True).logits)
    torch.testing.assert_close(torch.cat(pieces, 1), full, rtol=1e-5, atol=1e-5)
    generated = model.generate(x[:, :4], max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert generated.shape == (2, 8)


def test_presets_set_the_papers_choices_and_explicit_arguments_win():
    plus = MoEConfig(**TINY, moe_preset="moe_plus_plus")
    assert (plus.moe_zero_experts, plus.moe_copy_experts, plus.moe_constant_experts) == (1, 1, 2)
    assert plus.moe_gating_residual and plus.num_routed_experts == 8 + 4
    pool = MoEConfig(**TINY, moe_preset="unipool")
    assert pool.moe_expert_pool == "global" and pool.moe_router == "norm_router"
    assert pool.moe_pool_size == 8 * 3 // 2 and pool.moe_load_balance_scope == "pool"
    assert MoEConfig(**TINY, moe_preset="unipool", moe_pool_size=5).moe_pool_size == 5
    block = MoEConfig(**TINY, moe_preset="blockffn", moe_tls_coef=0.5)
    assert block.moe_router == "relu_rmsnorm" and block.moe_tls_coef == 0.5 and block.moe_cls_coef > 0


def test_unipool_experts_are_one_tensor_saved_once_with_gradients_from_every_layer(tmp_path):
    model = build("unipool", moe_pool_size=6).train()
    pool = model.model.expert_pool
    assert all(layer.mlp.experts is None for layer in model.model.layers)
    assert [n for n, _ in model.named_parameters() if n.endswith("gate_up_proj")] == ["model.expert_pool.gate_up_proj"]

    outputs = []
    hooks = [layer.mlp.register_forward_hook(lambda m, a, o: outputs.append(o[0])) for layer in model.model.layers]
    model(ids(2, 8))
    for hook in hooks:
        hook.remove()
    assert len(outputs) == 3
    for layer_output in outputs:  # each layer on its own sends gradient into the shared weights
        grad, = torch.autograd.grad(layer_output.sum(), pool.gate_up_proj, retain_graph=True)
        assert grad.abs().sum() > 0

    model.save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        keys = list(f.keys())
    assert [k for k in keys if "gate_up_proj" in k] == ["model.expert_pool.gate_up_proj"]
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids(1, 7)).logits, model.eval()(ids(1, 7)).logits, rtol=1e-5, atol=1e-6)


def test_pool_size_is_independent_of_depth():
    def pool_params(layers):
        config = MoEConfig(**{**TINY, "num_hidden_layers": layers}, moe_preset="unipool", moe_pool_size=6)
        model = AutoModelForCausalLM.from_config(config)
        return sum(p.numel() for n, p in model.named_parameters() if "expert_pool" in n)

    assert pool_params(2) == pool_params(6) > 0


def test_aux_loss_is_added_to_the_language_model_loss():
    model = build("moe_plus_plus", moe_z_loss_coef=0.01)
    x = ids(2, 10)
    with torch.no_grad():
        out = model(x, labels=x, output_router_logits=True)
        plain = model.loss_function(logits=out.logits, labels=x, vocab_size=TINY["vocab_size"])
    expected_aux, terms = moe_auxiliary_losses(out.router_logits, model.config)
    assert set(terms) == {"load_balance", "z_loss"}
    torch.testing.assert_close(out.aux_loss, expected_aux)
    torch.testing.assert_close(out.loss, plain + expected_aux)
    assert len(out.router_logits) == 3 and out.router_logits[0].shape == (2, 10, 12)
    # Inference without labels: no aux loss, no router logits unless asked.
    lean = model(x)
    assert lean.aux_loss is None and lean.router_logits is None


def test_gating_residual_gradient_survives_gradient_checkpointing():
    model = build("moe_plus_plus").train()
    with torch.no_grad():
        for layer in model.model.layers[1:]:
            layer.mlp.router.residual_proj.weight.normal_(std=0.1)
    x = ids(2, 8)

    def grads():
        model.zero_grad()
        model(x, labels=x).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    reference = grads()
    model.gradient_checkpointing_enable()
    checkpointed = grads()
    model.gradient_checkpointing_disable()
    assert reference.keys() == checkpointed.keys()
    assert reference["model.layers.0.mlp.router.weight"].abs().sum() > 0  # reached through layer 1's residual
    for name in reference:
        torch.testing.assert_close(checkpointed[name], reference[name], rtol=1e-4, atol=1e-6)


def test_routing_stats_match_the_router_logits():
    model = build("moe_plus_plus")
    stats = hf_arch.enable_routing_stats(model, chunk_size=4)
    x = ids(2, 8)
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, :3] = 0
    with torch.no_grad():
        out = model(x, attention_mask=mask, output_router_logits=True)
    hf_arch.disable_routing_stats(model)
    assert all(layer.mlp.stats is None for layer in model.model.layers)
    chosen = [selected_mask(l, "softmax_topk", 2) & mask.bool()[..., None] for l in out.router_logits]
    ffn = sum(int(c[..., :8].sum()) for c in chosen)
    zc = sum(int(c[..., 8:].sum()) for c in chosen)
    summary = stats.summary()
    assert summary["moe/active_experts_per_token"] == pytest.approx(ffn / (3 * int(mask.sum())))
    assert summary["moe/zero_computation_share"] == pytest.approx(zc / (ffn + zc))
    assert 0.0 <= summary["moe/chunk_level_sparsity_4"] <= 1.0
    assert len(stats.per_layer_load()) == 3


def test_trainer_logs_routing_stats_and_learns(tmp_path):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    from hf_arch.recipes.moe_logging import RoutingStatsCallback

    model = build("blockffn").train()
    rows = ids(16, 12, seed=5)
    data = Dataset.from_dict({"input_ids": rows.tolist(), "labels": rows.tolist()})
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=12, per_device_train_batch_size=4, learning_rate=3e-3,
                             logging_steps=4, report_to=[], save_strategy="no", use_cpu=True)
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[RoutingStatsCallback()])
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 3
    assert all("moe/active_experts_per_token" in entry and "moe/chunk_level_sparsity_8" in entry for entry in logged)
    assert logged[-1]["loss"] < logged[0]["loss"]
    assert all(layer.mlp.stats is None for layer in model.model.layers)


@pytest.mark.parametrize("name, owner", [("qwen_moe", "experts"), ("unipool", "expert_pool")])
def test_lora_reaches_the_experts_through_target_parameters(tmp_path, name, owner):
    from peft import LoraConfig, PeftModel, get_peft_model

    model = build(name)
    x = ids(1, 9)
    with torch.no_grad():
        base = model(x).logits
    targets = hf_arch.lora_target_parameters(model)
    assert targets == [f"{owner}.gate_up_proj", f"{owner}.down_proj"]
    config = LoraConfig(r=4, lora_alpha=8, target_modules=hf_arch.lora_target_modules(model),
                        target_parameters=targets)
    peft_model = get_peft_model(model, config)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert any(owner in n and "lora" in n for n in trainable)
    assert not any(n.endswith(("gate_up_proj", "down_proj")) and "lora" not in n for n in trainable)
    with torch.no_grad():
        torch.testing.assert_close(peft_model(x).logits, base)  # LoRA B starts at zero
        for n, p in peft_model.named_parameters():
            if owner in n and "lora_B" in n:
                p.normal_(std=0.5)
        adapted = peft_model(x).logits
    assert (adapted - base).abs().max() > 1e-3
    peft_model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert sorted(saved["target_parameters"]) == sorted(targets)
    reloaded = PeftModel.from_pretrained(build(name), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x).logits, adapted)


def test_accelerate_device_map_load_matches(tmp_path):
    model = build("moe_plus_plus")
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, device_map="cpu").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids(1, 6)).logits, model(ids(1, 6)).logits, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("overrides, message", [
    (dict(num_experts=4, num_experts_per_tok=5), "num_experts_per_tok (5) is larger than the number of routed"),
    (dict(moe_expert_pool="global", moe_pool_size=1, num_experts_per_tok=2), "moe_pool_size (1) is smaller"),
    (dict(moe_router="top2_softmax"), "moe_router must be one of"),
    (dict(moe_load_balance_coef=-0.1), "moe_load_balance_coef must be a number >= 0"),
    (dict(moe_z_loss_coef=float("nan")), "moe_z_loss_coef must be a number >= 0"),
    (dict(moe_tls_coef=0.1), "moe_router='relu_rmsnorm'"),
    (dict(moe_zero_experts=-1), "moe_zero_experts must be an integer >= 0"),
    (dict(moe_preset="deepseek"), "moe_preset must be one of"),
    (dict(mlp_layer_types=["sparse", "moe", "dense"]), "unsupported entries ['moe']"),
    (dict(moe_sparse_step=0), "moe_sparse_step must be an integer >= 1"),
    (dict(moe_load_balance_scope="pool"), "needs moe_expert_pool='global'"),
    (dict(moe_router="stochastic"), "set moe_load_balance_coef=0"),
    (dict(moe_router="sinkhorn", moe_sinkhorn_iterations=0), "moe_sinkhorn_iterations must be an integer >= 1"),
    (dict(moe_router="sinkhorn", moe_sinkhorn_imbalance=0.5), "moe_sinkhorn_imbalance must be a number >= 1"),
    (dict(moe_router="activation_dense_to_sparse", moe_router_temperature=0.0), "moe_router_temperature must be"),
    (dict(moe_router="activation_dense_to_sparse", moe_router_threshold=1.0), "moe_router_threshold must be"),
    (dict(moe_router="activation_dense_to_sparse", moe_router_activation="swish"), "moe_router_activation must be"),
    (dict(moe_router="dynamic_topk", moe_dynamic_k="entropy"), "moe_dynamic_k must be one of"),
    (dict(moe_router="dynamic_topk", moe_dynamic_threshold=0.0), "moe_dynamic_threshold must be a number in (0, 1]"),
    (dict(moe_router="dynamic_topk", num_experts_per_tok=9), "num_experts_per_tok (9) is larger"),
    (dict(moe_capacity_schedule="zigzag"), "moe_capacity_schedule must be one of"),
    (dict(moe_capacity_schedule="pyramid", moe_capacity_min=3), "moe_capacity_min (3) is larger"),
    (dict(moe_router="relu_rmsnorm", moe_capacity_schedule="wave"), "chooses its own number"),
    (dict(moe_sinkhorn_iterations=5), "moe_sinkhorn_iterations"),  # sinkhorn's option on a softmax router
    (dict(moe_capacity_min=2), "moe_capacity_min"),  # the schedule's option with a uniform capacity
])
def test_bad_moe_configs_fail_at_config_time(overrides, message):
    with pytest.raises(ValueError) as err:
        MoEConfig(**TINY, **overrides)
    assert message in str(err.value)


def test_sparse_step_and_explicit_layout():
    assert MoEConfig(**TINY, moe_sparse_step=2).mlp_layer_types == ["dense", "sparse", "dense"]
    assert MoEConfig(**TINY).mlp_layer_types == ["sparse"] * 3
    dense = {k: v for k, v in TINY.items() if k != "moe_intermediate_size"}  # a dense model refuses MoE options
    assert hf_arch.GatedAttentionConfig(**dense).mlp_layer_types == ["dense"] * 3


def test_triton_expert_backend_matches_torch_in_the_model(monkeypatch):
    pytest.importorskip("triton")
    model = build("qwen_moe").train()
    x = ids(2, 6)

    def run(backend):
        monkeypatch.setenv("HF_ARCH_KERNEL_BACKEND", backend)
        model.zero_grad()
        out = model(x, labels=x)
        out.loss.backward()
        experts = model.model.layers[0].mlp.experts
        return out.logits.detach(), experts.gate_up_proj.grad.clone(), experts.down_proj.grad.clone()

    for ours, theirs in zip(run("triton"), run("torch")):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
