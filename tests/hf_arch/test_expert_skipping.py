"""MoDES expert skipping (issue 21 item 4): the hook drops exactly the assignments whose ``α_l · π`` is below the
threshold, on our MoE layers and on transformers' Qwen3-MoE, Qwen2-MoE and Mixtral blocks; thresholds from
calibration hit the target skip rate; the layer importance measures what skipping a layer changes; decoding with
skipping equals the full forward; bad input is refused by name; the benchmark writes its curve."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, MixtralConfig, Qwen2MoeConfig, Qwen3MoeConfig

import hf_arch
from hf_arch.expert_skipping import ExpertSkipping, layer_importance, skip_scores, threshold_for_skip_rate

SHAPE = dict(vocab_size=71, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
             pad_token_id=0, eos_token_id=1, bos_token_id=2)


def ours(seed=0):
    torch.manual_seed(seed)
    config = hf_arch.MoEConfig(**SHAPE, intermediate_size=48, num_experts=6, num_experts_per_tok=3,
                               moe_intermediate_size=16)
    return AutoModelForCausalLM.from_config(config).eval()


def theirs(kind: str, seed=0):
    torch.manual_seed(seed)
    if kind == "qwen3_moe":
        config = Qwen3MoeConfig(**SHAPE, intermediate_size=48, moe_intermediate_size=16, num_experts=6,
                                num_experts_per_tok=3, norm_topk_prob=True)
    elif kind == "qwen2_moe":
        config = Qwen2MoeConfig(**SHAPE, intermediate_size=48, moe_intermediate_size=16, num_experts=6,
                                num_experts_per_tok=3, shared_expert_intermediate_size=16)
    else:
        config = MixtralConfig(**SHAPE, intermediate_size=16, num_local_experts=6, num_experts_per_tok=3)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # transformers initialises routers at 0 (uniform): give them rows that choose
        for module in model.modules():
            if hasattr(module, "gate") and hasattr(module, "experts"):
                module.gate.weight.normal_(0, 0.5)
    return model


def ids(B=2, T=12, seed=1):
    return torch.randint(3, 71, (B, T), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_our_layer_with_skipping_equals_the_kept_experts_summed_by_hand():
    model = ours()
    layer = model.model.layers[1].mlp
    x = torch.randn(1, 20, 32, generator=torch.Generator().manual_seed(3))
    routing = layer.router(x.view(-1, 32))
    probability = routing.logits.softmax(-1)[routing.token_idx, routing.expert_idx]
    importance = [1.0, 0.5, 2.0]
    threshold = float(0.5 * probability.median())
    keep = 0.5 * probability >= threshold
    assert 0 < int(keep.sum()) < keep.numel()
    expected = torch.zeros(20, 32)
    experts = layer.experts
    for t, e, w, k in zip(routing.token_idx, routing.expert_idx, routing.weight, keep):
        if not k:
            continue
        gate, up = (experts.gate_up_proj[e] @ x[0, t]).chunk(2)
        expected[t] += w * layer.routed_scale * (experts.down_proj[e] @ (F.silu(gate) * up))
    with ExpertSkipping(model, threshold=threshold, importance=importance) as skipping:
        out, _ = layer(x)
    torch.testing.assert_close(out[0], expected, rtol=1e-5, atol=1e-6)
    assert skipping.skipped[1] == int((~keep).sum()) and skipping.assignments[1] == keep.numel()


@pytest.mark.parametrize("kind", ["qwen3_moe", "qwen2_moe", "mixtral"])
@torch.no_grad()
def test_transformers_blocks_with_skipping_equal_their_experts_with_the_skipped_weights_zeroed(kind):
    model = theirs(kind)
    block = model.model.layers[2].mlp
    x = torch.randn(20, 32, generator=torch.Generator().manual_seed(3))
    logits, scores, indices = block.gate(x)
    probability = logits.float().softmax(-1).gather(-1, indices)
    threshold = float(probability.median())
    keep = probability >= threshold
    assert 0 < int(keep.sum()) < keep.numel()
    expected = block.experts(x, indices, scores * keep)
    if kind == "qwen2_moe":
        expected = expected + torch.sigmoid(block.shared_expert_gate(x)) * block.shared_expert(x)
    with ExpertSkipping(model, threshold=threshold) as skipping:
        out = block(x[None])
    torch.testing.assert_close(out[0], expected, rtol=1e-5, atol=1e-6)
    assert skipping.skip_rate() == pytest.approx(float((~keep).float().mean()))
    assert [name for name, _, k in skipping.routers] == [f"model.layers.{i}.mlp.gate" for i in range(3)]


@pytest.mark.parametrize("build", [ours, lambda: theirs("qwen3_moe")], ids=["hf_arch", "qwen3_moe"])
@torch.no_grad()
def test_no_threshold_changes_nothing_and_hooks_come_off(build):
    model = build()
    x = ids()
    reference = model(x).logits
    with ExpertSkipping(model, threshold=float("-inf")) as skipping:
        torch.testing.assert_close(model(x).logits, reference)
    assert skipping.skip_rate() == 0.0 and sum(skipping.assignments) == 3 * 24 * 3
    skipping.reset_counts()
    with skipping:
        skipping.threshold = 1.1  # every probability is below: every routed expert skipped
        skipped = model(x).logits
    assert skipping.skip_rate() == 1.0 and not torch.allclose(skipped, reference)
    torch.testing.assert_close(model(x).logits, reference)  # detached on exit


@pytest.mark.parametrize("build", [ours, lambda: theirs("qwen3_moe")], ids=["hf_arch", "qwen3_moe"])
@torch.no_grad()
def test_calibrated_threshold_hits_the_target_skip_rate_and_decoding_matches_the_full_forward(build):
    model = build()
    batches = [{"input_ids": ids(2, 16, seed=s)} for s in range(3)]
    skipping = ExpertSkipping(model, importance=layer_importance(model, batches, progress=False))
    scores = skip_scores(skipping, model, batches)
    assert scores.numel() == 3 * 2 * 16 * 3 * 3
    for target in (0.25, 0.5, 0.8):
        skipping.threshold = threshold_for_skip_rate(skipping, model, batches, target)
        with skipping:
            for batch in batches:
                model(**batch)
        # within one assignment of the target, or as close as the few correction passes got (skipping moves
        # later layers' scores)
        assert skipping.skip_rate() == pytest.approx(target, abs=0.01)
        skipping.reset_counts()
    x = ids(2, 10, seed=9)
    with skipping:
        full = model(x).logits
        out = model(x[:, :6], use_cache=True)
        pieces, cache = [out.logits], out.past_key_values
        for t in range(6, 10):
            pieces.append(model(x[:, t:t + 1], past_key_values=cache, use_cache=True).logits)
        torch.testing.assert_close(torch.cat(pieces, 1), full, rtol=1e-5, atol=1e-5)
        assert torch.equal(model.generate(x[:, :4], max_new_tokens=5, do_sample=False),
                           model.generate(x[:, :4], max_new_tokens=5, do_sample=False, use_cache=False))


@torch.no_grad()
def test_layer_importance_is_zero_for_a_layer_whose_experts_do_nothing():
    model = ours()
    model.model.layers[0].mlp.experts.down_proj.zero_()  # skipping layer 0's experts changes nothing
    batches = [{"input_ids": ids(2, 16, seed=s)} for s in range(2)]
    importance = layer_importance(model, batches, progress=False)
    assert importance[0] == pytest.approx(0.0, abs=1e-9)
    assert min(importance[1:]) > 0 and sum(importance) == pytest.approx(3.0)


def test_bad_input_is_refused_by_name():
    dense = AutoModelForCausalLM.from_config(hf_arch.GatedAttentionConfig(**SHAPE, intermediate_size=48))
    with pytest.raises(ValueError, match="has no MoE routers"):
        ExpertSkipping(dense)
    with pytest.raises(ValueError, match="importance has 2 values for 3 MoE layers"):
        ExpertSkipping(ours(), importance=[1.0, 1.0])
    with pytest.raises(ValueError, match="importance values must be >= 0"):
        ExpertSkipping(ours(), importance=[1.0, -1.0, 1.0])
    model = ours()
    with pytest.raises(ValueError, match=r"target skip rate must be in \[0, 1\)"):
        threshold_for_skip_rate(ExpertSkipping(model), model, [{"input_ids": ids()}], 1.0)


def _word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["the", "cat", "sat", "on", "mat", "a", "dog", "ran", "far", "and", "then", "home", "big", "red", "sun"]
    vocab = {"<pad>": 0, "</s>": 1, "<s>": 2, "[UNK]": 3, **{w: i + 4 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", bos_token="<s>"), words


def test_bench_modes_writes_the_curve_and_refuses_to_overwrite(tmp_path, capsys):
    from hf_arch.recipes.modes_benchmark import main

    tokenizer, words = _word_tokenizer()
    model = ours()
    model.save_pretrained(tmp_path / "model", remote_code=False)
    tokenizer.save_pretrained(tmp_path / "model")
    rng = torch.Generator().manual_seed(0)
    text = " ".join(words[int(i)] for i in torch.randint(0, len(words), (1200,), generator=rng))
    (tmp_path / "text.txt").write_text(text)
    argv = [str(tmp_path / "model"), "--calibration-file", str(tmp_path / "text.txt"), "--eval-file",
            str(tmp_path / "text.txt"), "--targets", "0.3", "0.6", "--calibration-tokens", "256", "--eval-tokens",
            "512", "--block-size", "32", "--out", str(tmp_path / "out")]
    assert main(argv) == 0
    result = json.loads((tmp_path / "out" / "modes.json").read_text())
    assert [(p["method"], p["target"]) for p in result["points"]] == [
        ("modes", 0.3), ("modes", 0.6), ("local", 0.3), ("local", 0.6)]
    for p in result["points"]:
        assert abs(p["skip_rate"] - p["target"]) < 0.15 and p["ppl"] > 0
    assert result["dense"]["tokens"] > 400 and len(result["importance"]) == 3
    assert (tmp_path / "out" / "modes.png").stat().st_size > 0 and "| modes | 0.30 |" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="exists; pass --overwrite"):
        main(argv)
    with pytest.raises(SystemExit, match="--targets must be in"):
        main([*argv[:-2], "--out", str(tmp_path / "other"), "--targets", "1.2"])
    with pytest.raises(ValueError, match="too few for"):
        main([*argv[:-2], "--out", str(tmp_path / "other"), "--eval-tokens", "1100"])
