"""Learned sparse attention layers: the SeerAttention block gate (pooling, causality, distillation target, block
selection), block-sparse prefill against dense attention, and the Flux layer router (identity at init, sparse
branch, decode against the full forward, the Lagrangian)."""

from __future__ import annotations

import math

import pytest
import torch

from hf_arch import SparseAttentionConfig, SparseAttentionForCausalLM
from hf_arch.layers.sparse_attention import (
    attention_density,
    flux_sparse_share,
    flux_sparsity_penalty,
    select_blocks,
    sparse_attention_layers,
)

BLOCK = 16


def model_for(method: str, **overrides) -> SparseAttentionForCausalLM:
    torch.manual_seed(0)
    base = dict(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, sparse_attn_block_size=BLOCK, attn_implementation="eager")
    if method == "flux":  # the window of Flux's sparse branch (a Seer config refuses Flux options)
        base["sparse_attn_window_blocks"] = 1
    return SparseAttentionForCausalLM(SparseAttentionConfig(sparse_attn_method=method, **{**base, **overrides})).eval()


def ids(rows=2, length=70, seed=1):
    return torch.randint(0, 64, (rows, length), generator=torch.Generator().manual_seed(seed))


def dense_logits(model, input_ids, **kwargs):
    with torch.no_grad():
        return model(input_ids, sparse_attention_mode="dense", **kwargs).logits


# -- block gate ------------------------------------------------------------------------------------------------

def _gate_inputs(model, x):
    """The first layer's pre-RoPE q and k on the embedded tokens (what the gate sees)."""
    layer = model.model.layers[0]
    hidden = layer.input_layernorm(model.model.embed_tokens(x))
    q, k, _ = layer.self_attn.project(hidden)
    return layer.self_attn, q, k


def test_gate_is_a_causal_distribution_over_key_blocks():
    model = model_for("seer")
    attn, q, k = _gate_inputs(model, ids())
    log_probs = attn.block_gate(q, k)
    N = math.ceil(70 / BLOCK)
    assert log_probs.shape == (2, 4, N, N)
    probs = log_probs.exp()
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 4, N))
    assert (probs.triu(1) == 0).all()
    # Row i reads only query block i and key blocks <= i: changing the last block moves no earlier row.
    changed = ids()
    changed[:, 64:] = (changed[:, 64:] + 1) % 64
    _, q2, k2 = _gate_inputs(model, changed)
    moved = (attn.block_gate(q2, k2).exp() - probs).abs().amax(dim=(0, 1, 3))
    assert (moved[:-1] == 0).all() and moved[-1] > 0


def test_gate_ignores_padding_and_keeps_left_padded_rows_valid():
    model = model_for("seer")
    attn, q, k = _gate_inputs(model, ids())
    token = torch.ones(2, 70, dtype=torch.long)
    token[0, :40] = 0  # left padding: blocks 0-1 hold no real token in row 0
    probs = attn.block_gate(q, k, token).exp()
    assert torch.isfinite(probs).all()
    assert (probs[0, :, 2:, :2] == 0).all()  # padding-only key blocks get no mass
    torch.testing.assert_close(probs.sum(-1), torch.ones_like(probs.sum(-1)))


@pytest.mark.parametrize("selection, extra, expect", [
    ("threshold", {"sparse_attn_threshold": 0.2}, [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]]),
    ("topk", {"sparse_attn_topk": 1}, [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 0, 1]]),
    ("budget", {"sparse_attn_token_budget": 2 * BLOCK}, [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]]),
    ("threshold", {"sparse_attn_threshold": 0.9}, [[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 0, 1]]),
])
def test_block_selection_keeps_first_and_diagonal_and_stays_causal(selection, extra, expect):
    config = model_for("seer", sparse_attn_selection=selection, **extra).config
    probs = torch.tensor([[1.0, 0, 0, 0], [0.4, 0.6, 0, 0], [0.1, 0.85, 0.05, 0], [0.1, 0.5, 0.25, 0.15]])
    mask = select_blocks(probs[None, None], config, context=4 * BLOCK)
    assert mask[0, 0].int().tolist() == expect


def test_a_token_budget_larger_than_the_context_is_refused():
    config = model_for("seer", sparse_attn_selection="budget", sparse_attn_token_budget=512).config
    with pytest.raises(ValueError, match=r"sparse_attn_token_budget \(512 tokens\) is larger than the context"):
        select_blocks(torch.ones(1, 1, 2, 2), config, context=70)


def test_seer_prefill_with_every_block_equals_dense_and_decode_matches_the_full_forward():
    model = model_for("seer", sparse_attn_selection="topk", sparse_attn_topk=100)
    x = ids()
    with torch.no_grad():
        out = model(x)
    sparse = out.logits
    assert attention_density(out) == 1.0
    torch.testing.assert_close(sparse, dense_logits(model, x), rtol=1e-5, atol=1e-5)
    out = model.generate(x[:, :48], attention_mask=torch.ones(2, 48, dtype=torch.long), max_new_tokens=6,
                         do_sample=False, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        full = model(out.sequences).logits
    for step, logits in enumerate(out.logits):
        torch.testing.assert_close(logits, full[:, 47 + step], rtol=1e-4, atol=1e-4)


def test_seer_prefill_skips_blocks_and_changes_only_what_it_skips():
    model = model_for("seer", sparse_attn_selection="topk", sparse_attn_topk=1)
    x = ids()
    with torch.no_grad():
        out = model(x)
    sparse = out.logits
    density = attention_density(out)
    N = math.ceil(70 / BLOCK)
    causal = N * (N + 1) / 2
    # Per row: the first block, the diagonal, and the gate's top block when it is neither (rows 2.. only).
    assert (2 * N - 1) / causal <= density <= (2 * N - 1 + N - 2) / causal < 1
    dense = dense_logits(model, x)
    # The first two blocks have nothing to skip (blocks 0 and 1 are first/diagonal): identical there.
    torch.testing.assert_close(sparse[:, : 2 * BLOCK], dense[:, : 2 * BLOCK], rtol=1e-5, atol=1e-5)
    assert (sparse[:, 2 * BLOCK:] - dense[:, 2 * BLOCK:]).abs().max() > 1e-4


def _brute_force_pooled(probs: torch.Tensor, block: int) -> torch.Tensor:
    """Max of the attention probabilities over each tile, causal tiles only, rows renormalised (plain loops)."""
    B, H, T, _ = probs.shape
    N = math.ceil(T / block)
    out = torch.zeros(B, H, N, N)
    for i in range(N):
        for j in range(i + 1):
            out[:, :, i, j] = probs[:, :, i * block:(i + 1) * block, j * block:(j + 1) * block].amax(dim=(-1, -2))
    return out / out.sum(-1, keepdim=True)


def test_gate_distillation_loss_is_the_kl_to_the_brute_force_pooled_attention_map():
    model = model_for("seer")
    x = ids()
    with torch.no_grad():  # eager: the probabilities themselves
        attentions = model(x, output_attentions=True, sparse_attention_mode="dense").attentions
    captured = {}
    layer0 = model.model.layers[0]
    hook = layer0.self_attn.register_forward_pre_hook(lambda m, args, kwargs: captured.update(h=args[0] if args
                                                                                                 else kwargs["hidden_states"]),
                                                      with_kwargs=True)
    try:
        out = model(x, use_cache=False, sparse_attention_mode="gate_distillation")
    finally:
        hook.remove()
    losses = out.gate_losses
    assert len(losses) == 2 and all(loss.requires_grad for loss in losses)
    torch.testing.assert_close(out.sparse_attention_loss, torch.stack(losses).mean())
    target = _brute_force_pooled(attentions[0].float(), BLOCK)
    q, k, _ = layer0.self_attn.project(captured["h"])
    log_gate = layer0.self_attn.block_gate(q, k)
    expected = torch.where(target > 0, target * (target.log() - log_gate), torch.zeros_like(target)).sum(-1).mean()
    torch.testing.assert_close(losses[0], expected, rtol=1e-4, atol=1e-6)


def test_gate_distillation_lowers_the_kl_and_trains_only_gates():
    model = model_for("seer")
    model.requires_grad_(False)
    gates = [p for layer in sparse_attention_layers(model) for p in layer.block_gate.parameters()]
    for p in gates:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(gates, lr=3e-2)
    x = ids(rows=4, length=96, seed=3)
    curve = []
    for _ in range(25):
        loss = model(x, use_cache=False, sparse_attention_mode="gate_distillation").sparse_attention_loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        curve.append(loss.item())
    assert curve[-1] < 0.6 * curve[0], curve


@pytest.mark.parametrize("reentrant", [False, True])
def test_plain_task_loss_trains_seer_gates_and_flux_routers_through_checkpointing(reentrant):
    """A training loss with labels carries the gates' self-distillation KL and the flux Lagrangian, so no parameter
    is left without a gradient (DDP would refuse it), also when a reentrant checkpoint drops side effects."""
    for method in ("seer", "flux"):
        model = model_for(method)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        model.train()
        x = ids()
        plain = model(x, labels=x)
        assert plain.sparse_attention_loss is not None and plain.sparse_attention_loss.requires_grad
        plain.loss.backward()
        missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
        assert not missing, (method, missing)
        if method == "seer":  # the KL reaches the gates only: q/k/v/o gradients are the task loss's alone
            gate_grads = {n: p.grad.clone() for n, p in model.named_parameters() if "block_gate" in n}
            model.zero_grad()
            model(x, labels=x).sparse_attention_loss.backward()
            assert all(p.grad is None or not p.grad.any() for n, p in model.named_parameters() if "block_gate" not in n)
            assert all(torch.allclose(p.grad, gate_grads[n]) for n, p in model.named_parameters() if "block_gate" in n)


def test_gate_distillation_needs_a_block_of_context():
    model = model_for("seer")
    with pytest.raises(ValueError, match=r"needs at least one block of context \(sparse_attn_block_size=16\), got 10"):
        model(ids(length=10), use_cache=False, sparse_attention_mode="gate_distillation")


# -- flux layer router -----------------------------------------------------------------------------------------

def test_flux_starts_as_the_dense_model():
    model = model_for("flux")
    x = ids()
    with torch.no_grad():
        out = model(x)
    logits = out.logits
    assert flux_sparse_share(out) == 0.0
    torch.testing.assert_close(logits, dense_logits(model, x), rtol=0, atol=0)


def _force_sparse(model):
    with torch.no_grad():
        for layer in sparse_attention_layers(model):
            layer.layer_router.out_bias.copy_(torch.tensor([-5.0, 5.0]))


def test_flux_sparse_branch_is_sink_plus_window_and_decode_matches_the_full_forward():
    model = model_for("flux")
    _force_sparse(model)
    x = ids()
    with torch.no_grad():
        out = model(x)
    sparse = out.logits
    assert flux_sparse_share(out) == 1.0
    dense = dense_logits(model, x)
    # With one sink block and a one-block window, the first two blocks see everything they would densely.
    torch.testing.assert_close(sparse[:, : 2 * BLOCK], dense[:, : 2 * BLOCK], rtol=1e-5, atol=1e-5)
    assert (sparse[:, 2 * BLOCK:] - dense[:, 2 * BLOCK:]).abs().max() > 1e-4
    # Decoding keeps the prompt's choice and attends the cached sink + window blocks only.
    mask = torch.ones(2, 40, dtype=torch.long)
    mask[1, :5] = 0  # left padding
    out = model.generate(x[:, :40], attention_mask=mask, max_new_tokens=12, do_sample=False, output_logits=True,
                         return_dict_in_generate=True)
    full_mask = torch.cat([mask, torch.ones(2, 12, dtype=torch.long)], dim=1)
    with torch.no_grad():
        full = model(out.sequences, attention_mask=full_mask).logits
    for step, logits in enumerate(out.logits):
        torch.testing.assert_close(logits, full[:, 39 + step], rtol=1e-4, atol=1e-4)


def test_flux_training_uses_a_straight_through_choice_and_the_lagrangian_ascends():
    model = model_for("flux", sparse_attn_router_bias=0.0, sparse_attn_target_sparsity=0.9)
    model.train()
    x = ids()
    out = model(x, labels=x)
    penalty = out.sparse_attention_loss
    assert penalty is not None and penalty.item() == 0.0  # the multipliers start at 0
    out.loss.backward()
    multipliers = model.model.sparsity_multipliers
    # s ≈ 0.5 < target 0.9: ascent on λ₁ means a positive gradient of the loss w.r.t. λ₁ reversed → negative grad.
    assert multipliers.grad[0] > 0
    routers = [layer.layer_router for layer in sparse_attention_layers(model)]
    assert all(r.out_bias.grad is not None for r in routers)  # gradient reaches the routers through the soft choice
    with torch.no_grad():
        multipliers.copy_(torch.tensor([2.0, 3.0]))
    probabilities = list(out.sparse_probabilities)
    value = flux_sparsity_penalty(probabilities, multipliers, 0.9)
    share = torch.cat(probabilities).mean()
    torch.testing.assert_close(value, 2.0 * (share - 0.9) + 3.0 * (share - 0.9) ** 2)
