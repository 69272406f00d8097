"""Lightning attention (layers/lightning_attention.py): the layer is its formula (activation, LRPE, fixed decays,
SRMSNorm, gate); padded rows equal the same rows unpadded; options and decays as TransNormerLLM's."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import hf_arch
from hf_arch.kernels.lightning import lightning_log_decay, naive_lightning_attention
from hf_arch.layers.lightning_attention import LightningAttention, LightningOptions
from hf_arch.layers.rope import HfArchRotaryEmbedding, apply_rotary_pos_emb

TINY = dict(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2)


def _layer(layer_idx=1, **options):
    config = hf_arch.LightningConfig(**TINY, mixer_options={"lightning": options} if options else None)
    torch.manual_seed(0)
    layer = LightningAttention(config, layer_idx).double()
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return config, layer


@pytest.mark.parametrize("options", [{}, dict(lrpe=False, qk_activation="identity", output_gate="sigmoid"),
                                     dict(output_gate="none", decay_base=2.0)])
@torch.no_grad()
def test_layer_is_its_formula(options):
    config, layer = _layer(**options)
    opts = LightningOptions(**options)
    B, T, H, H_kv, D = 2, 12, 4, 2, 8
    x = torch.randn(B, T, 32, dtype=torch.float64)
    positions = torch.arange(T)[None].expand(B, T)
    cos, sin = HfArchRotaryEmbedding(config)(x, positions)
    out, _ = layer(x, position_embeddings=(cos.double(), sin.double()))

    act = F.silu if opts.qk_activation == "silu" else (lambda t: t)
    q = act(layer.q_proj(x)).view(B, T, H, D)
    k = act(layer.k_proj(x)).view(B, T, H_kv, D).repeat_interleave(2, dim=2)
    v = layer.v_proj(x).view(B, T, H_kv, D).repeat_interleave(2, dim=2)
    if opts.lrpe:
        q, k = (t.transpose(1, 2) for t in apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin))
    decay = lightning_log_decay(H, 1, 3, base=opts.decay_base).double()
    o, _ = naive_lightning_attention(q, k, v, decay)
    o = o.reshape(B, T, H * D)
    o = o / o.pow(2).mean(-1, keepdim=True).add(config.rms_norm_eps).sqrt()
    if opts.output_gate != "none":
        u = layer.u_proj(x)
        o = o * {"identity": u, "sigmoid": torch.sigmoid(u), "silu": F.silu(u)}[opts.output_gate]
    torch.testing.assert_close(out, layer.o_proj(o), rtol=1e-9, atol=1e-9)


@torch.no_grad()
def test_left_padded_rows_equal_the_rows_alone():
    config = hf_arch.LightningConfig(**TINY, pad_token_id=0)
    torch.manual_seed(0)
    model = hf_arch.LightningForCausalLM(config).eval()
    ids = torch.randint(1, 61, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :4] = 0  # row 1: four padding tokens on the left
    padded = model(ids, attention_mask=mask).logits
    alone = model(ids[1:, 4:]).logits
    torch.testing.assert_close(padded[1, 4:], alone[0], rtol=1e-5, atol=1e-5)
    prompt = ids.clone()
    prompt[1, :4] = 0
    generated = model.generate(prompt, attention_mask=mask, max_new_tokens=5, do_sample=False)
    assert torch.equal(generated[1, 9:], model.generate(ids[1:, 4:], max_new_tokens=5, do_sample=False)[0, 5:])


def test_decays_follow_the_layer_schedule():
    config = hf_arch.LightningConfig(**TINY)
    model = hf_arch.LightningForCausalLM(config)
    decays = [layer.self_attn.log_decay for layer in model.model.layers]
    for index, decay in enumerate(decays):
        torch.testing.assert_close(decay, -(8 / 4) * (1 - index / 3) * torch.arange(4.0))
    assert all(d[0] == 0 for d in decays) and decays[0][-1] < decays[-1][-1] < 0  # deeper layers forget less


def test_bad_options_are_named():
    for bad, message in ((dict(qk_activation="relu"), "qk_activation"), (dict(output_gate="tanh"), "output_gate"),
                         (dict(decay_base=-1.0), "decay_base"), (dict(lrpe="yes"), "lrpe")):
        with pytest.raises(ValueError, match=message):
            LightningOptions(**bad)
