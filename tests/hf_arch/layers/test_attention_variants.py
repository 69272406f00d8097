"""Grouped Differential Attention, Cubit (KRR), SAS and GeoNorm: each layer against a direct computation (values and
gradients), decode against the full forward, save/load, PEFT and Trainer, GDA growth exact, and the bad inputs."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hf_arch.conversion import (
    SignalHeadGrowthOptions,
    grow_signal_heads,
    max_abs_logit_diff,
)
from hf_arch.kernels.krr.naive import naive_krr_attention
from transformers import AutoConfig, AutoModelForCausalLM

import hf_arch
from hf_arch import (
    CubitConfig,
    CubitForCausalLM,
    DiffAttentionConfig,
    DiffAttentionForCausalLM,
    GeoNormConfig,
    GeoNormForCausalLM,
    SASConfig,
    SASForCausalLM,
)
from hf_arch.cli import main
from hf_arch.configuration import HfArchConfig
from hf_arch.layers.geonorm import GeodesicUpdate
from hf_arch.layers.rope import apply_rotary_pos_emb

BASE = dict(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2)
VARIANTS = {
    "diff_attention": (DiffAttentionConfig, DiffAttentionForCausalLM, dict(diff_attn_noise_heads=2)),
    "cubit": (CubitConfig, CubitForCausalLM, dict(krr_value_range=1.0)),
    "sas": (SASConfig, SASForCausalLM, dict(sas_num_heads=8, sas_qk_dim=24)),
    "geonorm": (GeoNormConfig, GeoNormForCausalLM, dict(geonorm_step_init=0.7)),
}


def build(name, **overrides):
    config_class, model_class, kwargs = VARIANTS[name]
    torch.manual_seed(0)
    return model_class(config_class(**{**BASE, **kwargs, **overrides})).eval()


def _layer_inputs(model, x):
    layer = model.model.layers[0]
    hidden = layer.input_layernorm(model.model.embed_tokens(x)).detach().requires_grad_()
    return layer.self_attn, hidden, model.model.rotary_emb(hidden, torch.arange(x.shape[1])[None])


def _rope(q, k, rope):
    rq, rk = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), *rope)
    return rq.transpose(1, 2), rk.transpose(1, 2)  # back to [B, T, heads, D]


def _causal_softmax(scores):
    T = scores.shape[-1]
    return torch.softmax(scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf")), dim=-1)


def _rms(x, weight, eps):
    return weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def _assert_same_values_and_gradients(out, expected, parameters):
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    probe = torch.randn_like(out)
    got = torch.autograd.grad((out * probe).sum(), parameters)
    want = torch.autograd.grad((expected * probe).sum(), parameters)
    for g, w in zip(got, want):
        assert w.abs().max() > 0
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("head_norm", [True, False])
def test_grouped_differential_attention_is_signal_minus_lambda_shared_noise(head_norm):
    model = build("diff_attention", num_attention_heads=8, num_key_value_heads=4, head_dim=8,
                  diff_attn_head_norm=head_norm)
    x = torch.randint(0, 64, (2, 9))
    attn, hidden, rope = _layer_inputs(model, x)
    noise = attn.differential
    with torch.no_grad():
        noise.noise_lambda.uniform_(0.2, 0.9)  # distinct λ per signal head
    out, _ = attn(hidden, rope)

    q, k, v = attn.project(hidden)
    q, k = _rope(q, k, rope)
    qn, kn = _rope(*noise.project(hidden), rope)
    heads = []
    for h in range(8):  # 8 signal heads, 4 kv heads, 2 noise heads: signal head h uses noise head h // 4
        kv, n = h // 2, h // 4
        signal = _causal_softmax(q[:, :, h] @ k[:, :, kv].transpose(1, 2) * attn.scaling)
        noisy = _causal_softmax(qn[:, :, n] @ kn[:, :, n].transpose(1, 2) * attn.scaling)
        mixed = (signal - noise.noise_lambda[h] * noisy) @ v[:, :, kv]
        if head_norm:  # DIFF's per-head RMSNorm and (1 − λ_init) factor
            mixed = _rms(mixed, noise.head_norm.weight, noise.head_norm.variance_epsilon) * (1 - noise.lambda_init)
        heads.append(mixed)
    expected = attn.o_proj(torch.stack(heads, dim=2).flatten(2))
    _assert_same_values_and_gradients(out, expected, [noise.noise_lambda, noise.noise_q_proj.weight,
                                                      attn.q_proj.weight, attn.v_proj.weight])
    assert noise.noise_q_proj.weight.shape == (2 * 8, 64)  # 2 noise heads: fewer than the 8 signal heads
    assert noise.lambda_init == pytest.approx(0.8 - 0.6 * math.exp(0.0))


def test_cubit_layer_is_kernel_ridge_regression_on_range_limited_values():
    model = build("cubit", krr_ridge=0.5, krr_temperature=3.0, initializer_range=0.2)
    x = torch.randint(0, 64, (2, 10))
    attn, hidden, rope = _layer_inputs(model, x)
    out, _ = attn(hidden, rope)
    q, k, v = attn.project(hidden)
    q, k = _rope(q, k, rope)
    limited = torch.tanh(v / 1.0)  # LRR with krr_value_range = 1
    assert (v.abs() > 1).any()  # the rescale matters on these inputs
    expected = attn.finish(hidden, naive_krr_attention(q, k, limited, ridge=0.5, temperature=3.0))
    _assert_same_values_and_gradients(out, expected, [attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])


def test_sas_attends_over_simulated_heads_and_aggregates_them_back():
    model = build("sas")
    x = torch.randint(0, 64, (2, 7))
    attn, hidden, rope = _layer_inputs(model, x)
    sim = attn.simulated
    out, _ = attn(hidden, rope)
    q, k, v = attn.project(hidden)  # [B, T, 4, 16], [B, T, 2, 16]
    sim_q = torch.einsum("bthd,hg->btgd", q, sim.query_heads) @ sim.query_features  # 8 heads of width 24
    sim_k = torch.einsum("bthd,hg->btgd", k, sim.key_heads) @ sim.key_features  # 4 kv heads
    sim_v = torch.einsum("bthd,hg->btgd", v, sim.value_heads)
    rq, rk = _rope(sim_q[..., :16], sim_k[..., :16], rope)  # RoPE on the first head_dim features only
    sim_q, sim_k = torch.cat([rq, sim_q[..., 16:]], -1), torch.cat([rk, sim_k[..., 16:]], -1)
    heads = [_causal_softmax(sim_q[:, :, g] @ sim_k[:, :, g // 2].transpose(1, 2) / math.sqrt(24)) @ sim_v[:, :, g // 2]
             for g in range(8)]
    aggregated = torch.einsum("btgd,gh->bthd", torch.stack(heads, dim=2), sim.aggregate)
    expected = attn.o_proj(aggregated.flatten(2))
    _assert_same_values_and_gradients(out, expected, [sim.query_heads, sim.key_features, sim.aggregate,
                                                      attn.q_proj.weight])
    added = sum(p.numel() for p in sim.parameters())
    assert added == 4 * 8 + 2 * 2 * 4 + 2 * 16 * 24 + 8 * 4  # small next to q/k/v/o (4 · 64 · 64 · …)


def test_geodesic_update_moves_along_the_great_circle_by_the_learned_angle():
    config = HfArchConfig(residual_update="geodesic", geonorm_step_init=0.8, geonorm_layer_decay=0.5, **BASE)
    update = GeodesicUpdate(config, layer_idx=2)
    update.init_parameters()
    assert update.step.item() == pytest.approx(0.8 * 0.5**2)  # the layer-wise decay
    torch.manual_seed(0)
    h = torch.randn(3, 64)
    h = h / h.norm(dim=-1, keepdim=True) * 8.0  # radius √64
    u = torch.randn(3, 64) * 3
    out = update(h, u)
    torch.testing.assert_close(out.norm(dim=-1), torch.full((3,), 8.0))
    x = h / 8
    tangent = u - (u * x).sum(-1, keepdim=True) * x
    angle = update.step * tangent.norm(dim=-1) / 8
    cosine = (out / 8 * x).sum(-1)
    torch.testing.assert_close(cosine, torch.cos(angle))  # moved by exactly that angle …
    residual = out / 8 - torch.cos(angle)[:, None] * x
    torch.testing.assert_close(residual, torch.sin(angle)[:, None] * tangent / tangent.norm(dim=-1, keepdim=True))
    torch.testing.assert_close(update(h, torch.zeros_like(u)), h)  # … and a zero update stays put
    torch.testing.assert_close(update(h, 2.5 * h), h, rtol=1e-5, atol=1e-5)  # radial updates have no tangent part


def test_geonorm_model_keeps_every_residual_state_on_the_sphere():
    model = build("geonorm")
    out = model(torch.randint(0, 64, (2, 6)), output_hidden_states=True)
    for state in out.hidden_states[:-1]:  # the last one is after the final RMSNorm
        torch.testing.assert_close(state.norm(dim=-1), torch.full(state.shape[:2], 8.0), rtol=1e-5, atol=1e-5)
    steps = [layer.attn_update.step.item() for layer in model.model.layers]
    assert steps == pytest.approx([0.7, 0.7 * 0.9])


@pytest.mark.parametrize("name", sorted(VARIANTS))
@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_decode_with_left_padding_equals_the_full_forward(name, implementation):
    # Each composes with the gated-attention output gate and MoVE's value bank.
    model = build(name, attn_implementation=implementation, attn_output_gate="headwise", move_num_slots=4,
                  move_init="normal")
    x = torch.randint(0, 64, (2, 10))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, :3] = 0
    gen = model.generate(x, attention_mask=mask, max_new_tokens=5, do_sample=False, output_logits=True,
                         return_dict_in_generate=True, pad_token_id=0)
    with torch.no_grad():
        full = model(gen.sequences, attention_mask=torch.cat([mask, torch.ones(2, 5, dtype=torch.long)], 1)).logits
    for step, logits in enumerate(gen.logits):
        torch.testing.assert_close(logits, full[:, 9 + step], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_save_load_auto_classes_and_peft(name, tmp_path):
    from peft import LoraConfig, get_peft_model

    model = build(name)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(loaded) is type(model)
    ids = torch.randint(0, 64, (2, 8))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    targets = hf_arch.lora_target_modules(loaded)
    peft_model = get_peft_model(loaded, LoraConfig(r=2, lora_alpha=4, target_modules=targets))
    peft_model(ids, labels=ids).loss.backward()
    trainable = [p for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None for p in trainable)
    new = hf_arch.new_parameter_names(loaded)
    assert bool(new) == (name != "cubit")  # Cubit changes the computation only


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_trainer_lowers_the_loss(name, tmp_path):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    model = build(name).train()
    rows = torch.randint(0, 16, (16, 12), generator=torch.Generator().manual_seed(1)).tolist()  # a small vocab
    data = Dataset.from_dict({"input_ids": rows}).map(lambda r: {"labels": r["input_ids"]})
    x = torch.tensor(rows[:4])
    with torch.no_grad():
        before = model.eval()(input_ids=x, labels=x).loss.item()
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=10, per_device_train_batch_size=4, learning_rate=1e-2,
                             report_to=[], save_strategy="no", logging_steps=100, use_cpu=True, disable_tqdm=True)
    Trainer(model=model.train(), args=args, train_dataset=data).train()
    with torch.no_grad():
        after = model.eval()(input_ids=x, labels=x).loss.item()
    assert after < before - 0.1, (before, after)


@pytest.mark.parametrize("gate", [{}, {"attn_output_gate": "headwise"},
                                  {"attn_output_gate": "elementwise", "attn_output_gate_rank": 8}])
def test_growing_signal_heads_is_exact(gate):
    model = build("diff_attention", **gate)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.differential.noise_lambda.uniform_(0.1, 0.9)
    grown = grow_signal_heads(model, SignalHeadGrowthOptions(grow_signal_heads=3))
    assert grown.config.num_attention_heads == 12 and grown.config.diff_attn_noise_heads == 2
    assert grown.model.layers[0].self_attn.q_proj.weight.shape == (12 * 16, 64)
    ids = torch.randint(0, 64, (2, 16))
    assert max_abs_logit_diff(model, grown, ids) <= 1e-5
    with torch.no_grad():  # the copies are free to diverge: change one and the function changes
        grown.model.layers[0].self_attn.q_proj.weight[:16].normal_()
    assert max_abs_logit_diff(model, grown, ids) > 1e-3


def test_growth_from_the_command_line_and_its_bad_inputs(tmp_path, capsys, stories260k):
    model = build("diff_attention")
    model.save_pretrained(tmp_path / "gda")
    assert main(["convert", str(tmp_path / "gda"), str(tmp_path / "grown"), "--to", "diff_attention",
                 "--grow-signal-heads", "2", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["max_abs_logit_diff"] <= 1e-5
    assert AutoConfig.from_pretrained(tmp_path / "grown").num_attention_heads == 8
    with pytest.raises(ValueError, match="grow_signal_heads must be an integer >= 2"):
        SignalHeadGrowthOptions(grow_signal_heads=1).config_overrides()
    with pytest.raises(ValueError, match="converts a hfa_diff_attention checkpoint"):
        hf_arch.conversion.convert(stories260k, tmp_path / "x", to="diff_attention")


@pytest.mark.parametrize("overrides, message", [
    (dict(diff_attn_noise_heads=3), r"diff_attn_noise_heads \(3\) must divide num_attention_heads \(4"),
    (dict(diff_attn_noise_heads=-1), "diff_attn_noise_heads must be an integer >= 0"),
    (dict(diff_attn_noise_heads=2, attn_score_function="sa_softmax"), "does not combine"),
    (dict(diff_attn_noise_heads=2, diff_attn_head_norm="yes"), "diff_attn_head_norm must be a bool"),
    (dict(attn_score_function="krr", krr_ridge=0.0), r"krr_ridge .* must be a finite number > 0, got 0.0"),
    (dict(attn_score_function="krr", krr_ridge=-1.0), "krr_ridge"),
    (dict(attn_score_function="krr", krr_ridge=float("nan")), "krr_ridge"),
    (dict(krr_temperature=0), "krr_temperature must be > 0"),
    (dict(sas_num_heads=6), r"sas_num_heads \(6\) must be a multiple of num_attention_heads \(4\)"),
    (dict(sas_num_heads=8, sas_qk_dim=8), "sas_qk_dim must be an even integer >= head_dim"),
    (dict(residual_update="sandwich"), "residual_update must be one of"),
    (dict(residual_update="geodesic", geonorm_layer_decay=1.5), r"geonorm_layer_decay must be in \(0, 1\]"),
])
def test_bad_values_are_refused_naming_the_field(overrides, message):
    with pytest.raises(ValueError, match=message):
        HfArchConfig(**{**BASE, **overrides})


def test_variant_configs_refuse_turning_their_mechanism_off():
    with pytest.raises(ValueError, match="with 0 noise heads the model is plain attention"):
        DiffAttentionConfig(diff_attn_noise_heads=0, **BASE)
    with pytest.raises(ValueError, match="must be 'krr'"):
        CubitConfig(attn_score_function="softmax", **BASE)
    with pytest.raises(ValueError, match="must be 'geodesic'"):
        GeoNormConfig(residual_update="additive", **BASE)
    assert DiffAttentionConfig(**BASE).diff_attn_noise_heads == 2  # default: a 2:1 signal:noise split
    assert SASConfig(**BASE).sas_num_heads == 8 and SASConfig(**BASE).sas_qk_dim == 32
