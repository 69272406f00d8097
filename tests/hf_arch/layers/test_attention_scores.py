"""Attention-score variants of the softmax mixer: Self-Adjust Softmax and affine-scaled weights, each against a direct
computation, decode against the full forward, and the exact insertion of the affine scale into a checkpoint."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from hf_arch import AffineAttentionConfig, AffineAttentionForCausalLM, SASoftmaxConfig, SASoftmaxForCausalLM
from hf_arch.cli import main
from hf_arch.configuration import HfArchConfig
from hf_arch.conversion import insert_affine_scale, max_abs_logit_diff
from hf_arch.kernels.sa_softmax.naive import naive_sa_softmax_attention
from hf_arch.layers.affine_attention import mean_attended_values
from hf_arch.layers.rope import apply_rotary_pos_emb

BASE = dict(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2)


def _layer_inputs(model, x):
    """Layer 0's attention module, its normed input and RoPE tables."""
    layer = model.model.layers[0]
    hidden = layer.input_layernorm(model.model.embed_tokens(x))
    positions = torch.arange(x.shape[1])[None]
    return layer.self_attn, hidden, model.model.rotary_emb(hidden, positions)


def _qkv(attn, hidden, rope):
    q, k, v = attn.project(hidden)
    rq, rk = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), *rope)
    return rq.transpose(1, 2), rk.transpose(1, 2), v


def test_mean_attended_values_is_the_running_mean_of_real_keys():
    values = torch.randn(2, 2, 6, 3)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 0, 1]])
    out = mean_attended_values(values, num_queries=4, key_mask=mask, groups=2)  # the last 4 positions, 4 heads
    for b in range(2):
        for t, pos in enumerate(range(2, 6)):
            keys = [s for s in range(pos + 1) if mask[b, s]]
            for h in range(4):
                expected = values[b, h // 2, keys].mean(0) if keys else torch.zeros(3)
                torch.testing.assert_close(out[b, t, h], expected)


def test_mean_attended_values_on_a_window_averages_only_the_last_window_keys():
    values = torch.randn(2, 2, 7, 3)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 0, 1, 1]])
    window = 3
    out = mean_attended_values(values, num_queries=5, key_mask=mask, groups=1, window=window)
    for b in range(2):
        for t, pos in enumerate(range(2, 7)):
            keys = [s for s in range(max(0, pos - window + 1), pos + 1) if mask[b, s]]
            for h in range(2):
                expected = values[b, h, keys].mean(0) if keys else torch.zeros(3)
                torch.testing.assert_close(out[b, t, h], expected)
    # A sliding cache hands back only its window: the mask's last columns belong to the values.
    tail = mean_attended_values(values[:, :, -4:], num_queries=1, key_mask=mask, groups=1, window=window)
    torch.testing.assert_close(tail, out[:, -1:])


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
@torch.no_grad()
def test_affine_on_sliding_window_layers_decodes_past_the_window_like_the_full_forward(implementation):
    """The β term reads the window a sliding layer attends; a cache that keeps only the window cannot break it."""
    torch.manual_seed(0)
    config = AffineAttentionConfig(attn_affine_init="normal", initializer_range=0.5, sliding_window=3,
                                   layer_types=["sliding_attention", "full_attention"],
                                   attn_implementation=implementation, **BASE)
    model = AffineAttentionForCausalLM(config).eval()
    ids = torch.randint(0, 64, (2, 14), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    full = model(ids, attention_mask=mask).logits
    out = model(ids[:, :6], attention_mask=mask[:, :6], use_cache=True)
    pieces, cache = [out.logits], out.past_key_values
    for t in range(6, 14):
        pieces.append(model(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], past_key_values=cache,
                            use_cache=True).logits)
    torch.testing.assert_close(torch.cat(pieces, 1)[1], full[1], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(torch.cat(pieces, 1)[0, 2:], full[0, 2:], rtol=1e-4, atol=1e-4)
    # Without a cache the window matters too: a window covering everything changes the β term.
    wide = AffineAttentionForCausalLM(AffineAttentionConfig(**{**config.to_dict(), "sliding_window": 64})).eval()
    wide.load_state_dict(model.state_dict())
    assert (wide(ids, attention_mask=mask).logits - full).abs().max() > 1e-3


@pytest.mark.parametrize("function, mode", [("sa_softmax", "plain"), ("sa_softmax_normalized", "normalized")])
def test_sa_softmax_layer_computes_the_reference_weights_and_decodes_like_the_full_forward(function, mode):
    torch.manual_seed(0)
    model = SASoftmaxForCausalLM(SASoftmaxConfig(attn_score_function=function, **BASE)).eval()
    x = torch.randint(0, 64, (2, 20))
    attn, hidden, rope = _layer_inputs(model, x)
    q, k, v = _qkv(attn, hidden, rope)
    with torch.no_grad():
        out, _ = attn(hidden, rope)
        expected = attn.finish(hidden, naive_sa_softmax_attention(q, k, v, mode=mode, scale=attn.scaling))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)

    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :3] = 0
    gen = model.generate(x[:, :12], attention_mask=mask, max_new_tokens=6, do_sample=False, output_logits=True,
                         return_dict_in_generate=True)
    with torch.no_grad():
        full = model(gen.sequences, attention_mask=torch.cat([mask, torch.ones(2, 6, dtype=torch.long)], 1)).logits
    for step, logits in enumerate(gen.logits):
        torch.testing.assert_close(logits, full[:, 11 + step], rtol=1e-4, atol=1e-4)


def test_affine_layer_is_alpha_attention_plus_beta_mean_value_and_trains():
    torch.manual_seed(0)
    model = AffineAttentionForCausalLM(AffineAttentionConfig(attn_affine_init="normal", initializer_range=0.5,
                                                             attn_implementation="eager", **BASE)).eval()
    x = torch.randint(0, 64, (2, 10))
    attn, hidden, rope = _layer_inputs(model, x)
    q, k, v = _qkv(attn, hidden, rope)
    causal = torch.full((10, 10), float("-inf")).triu(1)[None, None]  # what the backbone passes to eager
    with torch.no_grad():
        out, _ = attn(hidden, rope, attention_mask=causal)
        groups = attn.num_key_value_groups
        kr, vr = k.repeat_interleave(groups, dim=2), v.repeat_interleave(groups, dim=2)
        scores = torch.einsum("bthd,bshd->bhts", q, kr) * attn.scaling
        scores = scores.masked_fill(torch.ones(10, 10, dtype=torch.bool).triu(1), float("-inf"))
        probs = scores.softmax(-1)
        coefficients = hidden @ attn.affine.weight.T  # [B, T, 2H]
        alpha, beta = 1 + coefficients[..., :4], coefficients[..., 4:]
        uniform = torch.ones(10, 10).tril() / torch.arange(1, 11)[:, None]  # β spreads over the attended keys
        weights = alpha.transpose(1, 2)[..., None] * probs + beta.transpose(1, 2)[..., None] * uniform
        assert attn.output_gate is None  # so o_proj is all that follows the affine map
        expected = attn.o_proj(torch.einsum("bhts,bshd->bthd", weights, vr).reshape(2, 10, -1))
    assert (alpha - 1).abs().max() > 0.1 and beta.abs().max() > 0.1  # the check is not vacuous
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=2e-6 * expected.abs().max().item())

    model.train()
    loss = model(x, labels=x).loss
    loss.backward()
    assert all(layer.self_attn.affine.weight.grad.abs().sum() > 0 for layer in model.model.layers)


def test_affine_insertion_is_exact_and_decodes_like_the_full_forward(stories260k, tmp_path, capsys):
    source = AutoModelForCausalLM.from_pretrained(stories260k, dtype=torch.float32).eval()
    target = insert_affine_scale(source)
    ids = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(0))
    assert max_abs_logit_diff(source, target, ids) == 0.0
    with torch.no_grad():  # trained away from identity: decode still equals the full forward
        for layer in target.model.layers:
            layer.self_attn.affine.weight.normal_(std=0.2)
    gen = target.generate(ids[:, :16], attention_mask=torch.ones(2, 16, dtype=torch.long), max_new_tokens=5,
                          do_sample=False, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        full = target(gen.sequences).logits
    for step, logits in enumerate(gen.logits):
        torch.testing.assert_close(logits, full[:, 15 + step], rtol=1e-4, atol=1e-4)

    assert main(["convert", str(stories260k), str(tmp_path / "affine"), "--to", "affine_attention", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["max_abs_logit_diff"] == 0.0
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "affine")
    assert loaded.config.model_type == "hfa_affine_attention" and loaded.config.attn_affine


@pytest.mark.parametrize("fields, message", [
    (dict(attn_score_function="sparsemax"), "attn_score_function must be one of"),
    (dict(attn_affine_init="ones"), "attn_affine_init must be 'identity' or 'normal'"),
    (dict(attn_affine=True, sparse_attn_method="seer"), "does not combine with"),
])
def test_bad_score_options_fail_clearly(fields, message):
    with pytest.raises(ValueError, match=message):
        HfArchConfig(**BASE, **fields)
    with pytest.raises(ValueError, match="must be 'sa_softmax' or 'sa_softmax_normalized'"):
        SASoftmaxConfig(attn_score_function="softmax", **BASE)
