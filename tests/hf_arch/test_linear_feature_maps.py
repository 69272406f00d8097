"""Linearization options of the linear mixer: key-pooled / no gate, softmax / Hedgehog feature maps, the normalised
linear branch, and attention-transfer mode (the layer returns its exact softmax teacher)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen3Config

from hf_arch import GatedDeltaNetConfig, GLAConfig
from hf_arch.layers.linear_attention import HfArchLinearAttention
from hf_arch.layers.rope import apply_rotary_pos_emb

TINY = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, eos_token_id=1, bos_token_id=2)
LAYOUTS = {
    "gla_key_pooled_softmax_liger": (GLAConfig, dict(linear_attn_gate="key_pooled", linear_attn_feature_map="softmax",
                                                     linear_attn_hybrid="liger", sliding_window=3)),
    "gla_hedgehog_normalized_lizard_sinks": (GLAConfig, dict(linear_attn_gate="none", linear_attn_feature_map="hedgehog",
                                                             linear_attn_normalize=True, linear_attn_hybrid="lizard",
                                                             linear_attn_num_sinks=2, sliding_window=3)),
    "gla_hedgehog_key_pooled_normalized": (GLAConfig, dict(linear_attn_gate="key_pooled",
                                                           linear_attn_feature_map="hedgehog",
                                                           linear_attn_normalize=True, linear_attn_conv_size=3)),
    "gated_deltanet_key_pooled": (GatedDeltaNetConfig, dict(linear_attn_gate="key_pooled")),
    "gated_deltanet_key_pooled_hedgehog": (GatedDeltaNetConfig, dict(linear_attn_gate="key_pooled",
                                                                     linear_attn_feature_map="hedgehog")),
    "gla_norm_aware_normalized": (GLAConfig, dict(linear_attn_feature_map="norm_aware", linear_attn_normalize=True)),
    "gated_deltanet_norm_aware": (GatedDeltaNetConfig, dict(linear_attn_feature_map="norm_aware")),
    "gated_deltanet_np_map": (GatedDeltaNetConfig, dict(linear_attn_feature_map="np_map")),
}


def build(name: str, seed: int = 0):
    config_class, extra = LAYOUTS[name]
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config_class(**TINY, **extra)).eval()
    with torch.no_grad():  # make sinks, the window weight and the feature maps matter (not at their init values)
        for param_name, param in model.named_parameters():
            if param_name.endswith(("sink_logits", "window_weight")):
                param.normal_()
            if param_name.endswith("feature_map"):
                param.add_(0.3 * torch.randn_like(param))
    return model


def ids(B: int, T: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, TINY["vocab_size"], (B, T), generator=torch.Generator().manual_seed(seed))


def test_recurrent_state_is_twice_as_wide_with_hedgehog():
    model = build("gla_hedgehog_normalized_lizard_sinks")
    out = model(ids(1, 5), use_cache=True)
    state = out.past_key_values.layers[0].recurrent_states[0]
    D = model.config.head_dim
    assert state.shape == (1, TINY["num_attention_heads"], 2 * D, D + 1)  # 2D features, [v, 1] values


def test_hedgehog_identity_init_is_softmax_of_both_signs():
    config = GLAConfig(**TINY, linear_attn_gate="none", linear_attn_feature_map="hedgehog")
    model = AutoModelForCausalLM.from_config(config)
    layer = model.model.layers[0].self_attn
    D = config.head_dim
    assert layer.q_feature_map.shape == (TINY["num_attention_heads"], D, D)
    assert layer.k_feature_map.shape == (TINY["num_key_value_heads"], D, D)
    q = torch.randn(2, 5, TINY["num_attention_heads"], D)
    k = torch.randn(2, 5, TINY["num_key_value_heads"], D)
    fq, fk = layer._feature_maps(q, k)
    torch.testing.assert_close(fq, torch.cat([q.softmax(-1), (-q).softmax(-1)], -1))
    torch.testing.assert_close(fk, torch.cat([k.softmax(-1), (-k).softmax(-1)], -1))


@pytest.mark.parametrize("gate", ["none", "key_pooled"])
@pytest.mark.parametrize("feature_map", ["softmax", "hedgehog", "norm_aware", "np_map"])
@torch.no_grad()
def test_normalized_branch_equals_direct_recurrence(gate, feature_map):
    """One head: S_t = decay_t·S_{t-1} + φ(k_t)ᵀv_t, z_t = decay_t·z_{t-1} + φ(k_t), o_t = φ(q_t)S_t / φ(q_t)·z_t."""
    config = GLAConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=1,
                       num_key_value_heads=1, linear_attn_gate=gate, linear_attn_feature_map=feature_map,
                       linear_attn_normalize=True, linear_attn_output_norm="none")
    torch.manual_seed(0)
    layer = HfArchLinearAttention(config, 0).double()
    for p in layer.parameters():
        p.normal_()
    layer.o_proj.weight.copy_(torch.eye(8, dtype=torch.float64))
    T = 6
    x = torch.randn(1, T, 8, dtype=torch.float64)
    out, _ = layer(x)

    q, k, v = layer.q_proj(x)[0], layer.k_proj(x)[0], layer.v_proj(x)[0]  # [T, D]
    if feature_map == "softmax":
        fq, fk = q.softmax(-1), k.softmax(-1)
    elif feature_map == "norm_aware":  # NaLaFormer, written out
        n = q.norm(dim=-1, keepdim=True)
        p = 3 * (0.5 + torch.tanh(n))
        fq = torch.cat([F.relu(q / n) ** p, F.relu(-q / n) ** p], -1)
        fk = torch.cat([F.relu(k) ** 3, F.relu(-k) ** 3], -1)
    else:
        pq, pk = q @ layer.q_feature_map[0], k @ layer.k_feature_map[0]
        fq, fk = torch.cat([pq.softmax(-1), (-pq).softmax(-1)], -1), torch.cat([pk.softmax(-1), (-pk).softmax(-1)], -1)
        if feature_map == "np_map":  # STILL: the pretrained norms on Hedgehog's directions
            fq = q.norm(dim=-1, keepdim=True) * fq / fq.norm(dim=-1, keepdim=True)
            fk = k.norm(dim=-1, keepdim=True) * fk / fk.norm(dim=-1, keepdim=True)
    decay = F.logsigmoid(k).exp() ** (1 / 16) if gate == "key_pooled" else torch.ones_like(k)
    if feature_map in ("hedgehog", "norm_aware", "np_map"):
        decay = torch.cat([decay, decay], -1)
    S = torch.zeros(fk.shape[-1], 8, dtype=torch.float64)
    z = torch.zeros(fk.shape[-1], dtype=torch.float64)
    ref = []
    for t in range(T):
        S = decay[t, :, None] * S + fk[t, :, None] * v[t][None]
        z = decay[t] * z + fk[t]
        ref.append((fq[t] @ S) / (fq[t] @ z))
    torch.testing.assert_close(out[0], torch.stack(ref), rtol=1e-6, atol=1e-6)  # gates are fp32


def test_gated_deltanet_key_pooled_decay_is_mean_of_the_key():
    model = build("gated_deltanet_key_pooled")
    layer = model.model.layers[0].self_attn
    assert layer.decay_proj is None and layer.forget_proj is None and layer.beta_proj is not None
    x = torch.randn(2, 5, TINY["hidden_size"])
    k_raw = layer.k_proj(x).view(2, 5, TINY["num_key_value_heads"], -1)
    g, beta = layer._gates(x, k_raw)
    expected = F.logsigmoid(k_raw.mean(-1)).repeat_interleave(2, dim=2) / 16
    torch.testing.assert_close(g, expected)
    assert beta.shape == (2, 5, TINY["num_attention_heads"])


def test_key_pooled_and_softmax_add_no_parameters():
    base = AutoModelForCausalLM.from_config(GLAConfig(**TINY, linear_attn_gate="key_pooled", linear_attn_output_norm="none",
                                                      linear_attn_feature_map="softmax"))
    names = {n.split("self_attn.")[-1] for n, _ in base.named_parameters() if "self_attn" in n}
    assert names == {"q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight"}


# -- LoLCATs' shared denominator ---------------------------------------------------------------------------------

def _lolcats_reference(layer, x, cos, sin):
    """LoLCATs' hybrid written out quadratically: keys in the window by ``γ·exp(q·k/√d - max over the window)``,
    older keys by ``w·φ(q)·φ(k)``, one denominator for both."""
    B, T, _ = x.shape
    H, H_kv, D, W = layer.num_heads, layer.num_key_value_heads, layer.head_dim, layer.window
    q = layer.q_proj(x).view(B, T, H, D)
    k = layer.k_proj(x).view(B, T, H_kv, D)
    v = layer.v_proj(x).view(B, T, H_kv, D).repeat_interleave(H // H_kv, dim=2).transpose(1, 2)
    qr, kr = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
    kr = kr.repeat_interleave(H // H_kv, dim=1)
    t = torch.arange(T)
    distance = t[:, None] - t[None, :]
    in_window, older = (distance >= 0) & (distance < W), distance >= W
    scores = (qr @ kr.transpose(-1, -2) / D**0.5).masked_fill(~in_window, float("-inf"))
    gamma = torch.sigmoid(layer.window_factor)[None, :, None, None]
    window_terms = gamma * torch.exp(scores - scores.amax(-1, keepdim=True))

    def hedgehog(z, weight):  # [B, T, h, D] -> [B, h, T, 2D]
        proj = torch.einsum("bthd,hde->bhte", z, weight)
        return torch.cat([proj.softmax(-1), (-proj).softmax(-1)], dim=-1)

    fq = hedgehog(q, layer.q_feature_map)
    fk = hedgehog(k, layer.k_feature_map).repeat_interleave(H // H_kv, dim=1)
    linear_terms = layer.config.linear_attn_mix_weights[0] * (fq @ fk.transpose(-1, -2)) * older
    weights = window_terms + linear_terms
    y = (weights @ v) / weights.sum(-1, keepdim=True)
    return layer.o_proj(y.transpose(1, 2).reshape(B, T, H * D))


def test_lolcats_hybrid_equals_its_quadratic_definition_and_softmax_inside_the_window():
    config = GLAConfig(**TINY, linear_attn_gate="none", linear_attn_feature_map="hedgehog", linear_attn_normalize=True,
                       linear_attn_hybrid="lolcats", sliding_window=5, linear_attn_mix_weights=[0.8, 0.2],
                       linear_attn_output_norm="none", linear_attn_conv_size=0)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    layer = model.model.layers[0].self_attn
    with torch.no_grad():
        layer.window_factor.normal_()
        layer.q_feature_map.add_(0.3 * torch.randn_like(layer.q_feature_map))
        layer.k_feature_map.add_(0.3 * torch.randn_like(layer.k_feature_map))
    x = torch.randn(2, 17, TINY["hidden_size"])
    cos, sin = model.model.rotary_emb(x, torch.arange(17)[None])
    out = layer(x, position_embeddings=(cos, sin))[0]
    torch.testing.assert_close(out, _lolcats_reference(layer, x, cos, sin), rtol=1e-5, atol=1e-5)

    # Up to the window's length no key is old enough for the linear terms: softmax attention of the same weights.
    short = x[:, :5]
    cos, sin = model.model.rotary_emb(short, torch.arange(5)[None])
    teacher = model.model.layers[0].self_attn(short, position_embeddings=(cos, sin), attention_transfer=True)[0]
    torch.testing.assert_close(layer(short, position_embeddings=(cos, sin))[0], teacher, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mix_weights, message", [([1.0, 1.0], "γ₀ in \\(0, 1\\)"), ([0.0, 0.5], "w_linear > 0")])
def test_lolcats_hybrid_rejects_bad_mixing(mix_weights, message):
    with pytest.raises(ValueError, match=message):
        GLAConfig(**TINY, linear_attn_gate="none", linear_attn_feature_map="hedgehog", linear_attn_normalize=True,
                  linear_attn_hybrid="lolcats", sliding_window=3, linear_attn_mix_weights=mix_weights)
    with pytest.raises(ValueError, match="needs linear_attn_normalize=True"):
        GLAConfig(**TINY, linear_attn_feature_map="hedgehog", linear_attn_hybrid="lolcats", sliding_window=3,
                  linear_attn_mix_weights=[1.0, 0.1])


# -- attention transfer -----------------------------------------------------------------------------------------

SOURCES = {
    "llama": (LlamaConfig, dict(rope_parameters={"rope_type": "default", "rope_theta": 5000.0})),
    "qwen3": (Qwen3Config, dict(head_dim=16, attention_bias=True)),
}
LINEAR_KW = dict(linear_attn_gate="none", linear_attn_feature_map="hedgehog", linear_attn_normalize=True,
                 linear_attn_hybrid="lizard", linear_attn_num_sinks=2, sliding_window=4, linear_attn_output_norm="none")


def _source_and_linear(source_name: str):
    config_class, extra = SOURCES[source_name]
    torch.manual_seed(0)
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "max_position_embeddings")
    source = AutoModelForCausalLM.from_config(config_class(**{k: TINY[k] for k in keys}, **extra)).eval()
    with torch.no_grad():
        for name, param in source.named_parameters():
            if "norm" in name or name.endswith("bias"):
                param.normal_(1.0 if "norm" in name else 0.0, 0.5)
    sc = source.config
    config = GLAConfig(**{k: getattr(sc, k) for k in keys}, head_dim=sc.head_dim, rms_norm_eps=sc.rms_norm_eps,
                       rope_parameters=dict(sc.rope_parameters), attention_bias=bool(sc.attention_bias),
                       qk_norm=source_name == "qwen3", **LINEAR_KW)
    linear = AutoModelForCausalLM.from_config(config).eval()
    missing, unexpected = linear.load_state_dict(source.state_dict(), strict=False)
    assert not unexpected and all(n.endswith(("feature_map", "window_weight", "sink_logits")) for n in missing)
    with torch.no_grad():
        for name, param in linear.named_parameters():
            if name.endswith(("sink_logits", "window_weight")):
                param.normal_()
    return source, linear


@pytest.mark.parametrize("source_name", sorted(SOURCES))
@torch.no_grad()
def test_attention_transfer_mode_reproduces_the_source_model(source_name):
    source, linear = _source_and_linear(source_name)
    x = ids(2, 24)
    assert (linear(x).logits - source(x).logits).abs().max() > 1e-3  # the linear model itself differs
    out = linear(x, use_cache=False, attention_transfer=True)
    torch.testing.assert_close(out.logits, source(x).logits, rtol=0, atol=1e-5)
    losses = out.transfer_losses
    assert len(losses) == TINY["num_hidden_layers"] and all(loss.item() > 0 for loss in losses)
    assert linear(x, use_cache=False).transfer_losses is None  # a mode of one call, not of the model

    # With left padding, the real positions still match the source.
    mask = torch.ones_like(x)
    mask[1, :5] = 0
    out = linear(x, attention_mask=mask, use_cache=False, attention_transfer=True)
    b = source(x, attention_mask=mask).logits
    assert (out.logits - b)[mask.bool()].abs().max() <= 1e-5
    assert all(torch.isfinite(loss) for loss in out.transfer_losses)


def test_attention_transfer_needs_no_cache():
    _, linear = _source_and_linear("llama")
    with pytest.raises(ValueError, match="use_cache=False"):
        linear(ids(1, 6), use_cache=True, attention_transfer=True)


def test_transfer_loss_trains_only_the_new_parameters():
    _, linear = _source_and_linear("llama")
    new = ("q_feature_map", "k_feature_map", "window_weight", "sink_logits")
    for name, param in linear.named_parameters():
        param.requires_grad_(name.endswith(new))
    linear.train()
    x = ids(4, 24, seed=9)
    losses = linear(x, attention_transfer=True).transfer_losses  # training mode: no cache
    total = torch.stack(losses).sum()
    assert total.dtype == torch.float32 and total.requires_grad and total.item() > 0
    total.backward()
    for name, param in linear.named_parameters():
        if name.endswith(new):
            assert param.grad is not None and param.grad.abs().sum() > 0, name
        else:
            assert param.grad is None, name

    trainable = [p for p in linear.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=1e-2)
    history = []
    for _ in range(15):
        optimizer.zero_grad()
        loss = torch.stack(linear(x, attention_transfer=True).transfer_losses).sum()
        loss.backward()
        optimizer.step()
        history.append(loss.item())
    assert history[-1] < 0.8 * history[0], history


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(linear_attn_feature_map="relu"), "linear_attn_feature_map must be one of"),
        (dict(linear_attn_gate="pooled"), "linear_attn_gate must be one of"),
        (dict(linear_attn_normalize=True), "needs a positive feature map"),
        (dict(linear_attn_normalize=1, linear_attn_feature_map="softmax"), "must be a bool"),
    ],
)
def test_config_rejects_bad_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GLAConfig(**TINY, **kwargs)


def test_normalize_is_gla_only():
    with pytest.raises(ValueError, match="applies to linear_attn_type='gla' only"):
        GatedDeltaNetConfig(**TINY, linear_attn_normalize=True, linear_attn_feature_map="softmax")


def test_save_load_keeps_trained_feature_maps(tmp_path):
    model = build("gla_hedgehog_normalized_lizard_sinks")  # feature maps moved away from their identity init
    model.save_pretrained(tmp_path / "m")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    for (name, a), (_, b) in zip(model.named_parameters(), loaded.named_parameters()):
        assert torch.equal(a, b), name
    assert loaded.config.linear_attn_feature_map == "hedgehog" and loaded.config.linear_attn_normalize


def test_norm_aware_map_is_sharper_for_longer_queries_and_pairs_same_signs_only():
    from hf_arch.layers.linear_attention import norm_aware_key, norm_aware_query

    torch.manual_seed(0)
    direction = F.normalize(torch.randn(1, 1, 1, 16), dim=-1)
    keys = torch.randn(1, 64, 1, 16)
    fk = norm_aware_key(keys)[0, :, 0]  # [64, 32]
    assert (fk >= 0).all() and (norm_aware_query(direction * 3) >= 0).all()

    def entropy(scale):  # of the normalised linear-attention weights of one query over the 64 keys
        w = fk @ norm_aware_query(direction * scale)[0, 0, 0]
        w = w / w.sum()
        return -(w * w.clamp(min=1e-30).log()).sum().item()

    entropies = [entropy(s) for s in (0.1, 0.5, 1.0, 3.0)]
    assert entropies == sorted(entropies, reverse=True) and entropies[0] - entropies[-1] > 0.1
    # Only same-sign dimensions interact: φ(q)·φ(k) = Σ_d [q_d k_d > 0] |q̂_d|^p |k_d|³.
    q, k = torch.randn(16, dtype=torch.float64), torch.randn(16, dtype=torch.float64)
    p = 3 * (0.5 + torch.tanh(q.norm()))
    expected = ((q * k > 0) * (q.abs() / q.norm()) ** p * k.abs() ** 3).sum()
    got = norm_aware_query(q.view(1, 1, 1, -1))[0, 0, 0] @ norm_aware_key(k.view(1, 1, 1, -1))[0, 0, 0]
    torch.testing.assert_close(got, expected)


def test_feature_maps_are_refused_on_kda_layers():
    from hf_arch import KDAConfig

    with pytest.raises(ValueError, match="applies to the GLA and Gated DeltaNet mixers; KDA"):
        KDAConfig(**TINY, linear_attn_feature_map="norm_aware")


def test_np_map_keeps_the_input_norm_and_the_learned_direction():
    from hf_arch.layers.linear_attention import _linear_hedgehog, norm_preserved_map

    torch.manual_seed(0)
    x = torch.randn(2, 5, 3, 8, dtype=torch.float64) * torch.linspace(0.1, 10, 5, dtype=torch.float64)[None, :, None, None]
    weight = torch.eye(8, dtype=torch.float64).expand(3, 8, 8) + 0.3 * torch.randn(3, 8, 8, dtype=torch.float64)
    phi = norm_preserved_map(x, weight)
    assert phi.shape == (2, 5, 3, 16) and (phi >= 0).all()
    torch.testing.assert_close(phi.norm(dim=-1), x.norm(dim=-1))  # the pretrained magnitude, whatever the map
    hedgehog = _linear_hedgehog(x, weight)
    torch.testing.assert_close(F.normalize(phi, dim=-1), F.normalize(hedgehog, dim=-1))  # the map's direction
    # Hedgehog alone loses the magnitude: its features sum to 2 for every input.
    torch.testing.assert_close(hedgehog.sum(-1), torch.full((2, 5, 3), 2.0, dtype=torch.float64))
