"""The greedy-generation check: agreement arithmetic, prompts from held-out text, batched continuations equal to an
uncached argmax loop."""

from __future__ import annotations

import pytest
import torch

from hf_arch.recipes.generation_check import agreement, greedy_continuations, held_out_prompts


def test_agreement_counts_positions_prefixes_and_identical_rows():
    reference = [[1, 2, 3, 4], [5, 6, 7, 8], [9, 9, 9, 9]]
    candidate = [[1, 2, 3, 4], [5, 0, 7, 8], [0, 9, 9, 9]]
    result = agreement(reference, candidate)
    assert result["prompts"] == 3 and result["new_tokens"] == 4
    assert result["token_agreement"] == pytest.approx((1 + 0.75 + 0.75) / 3, abs=1e-4)
    assert result["prefix_tokens_mean"] == pytest.approx((4 + 1 + 0) / 3, abs=0.01)
    assert result["identical"] == pytest.approx(1 / 3, abs=1e-4)
    assert result["token_agreement_stderr"] > 0
    assert agreement(reference, reference)["token_agreement"] == 1.0
    with pytest.raises(ValueError, match="3 reference continuations but 2 candidates"):
        agreement(reference, candidate[:2])
    with pytest.raises(ValueError, match="differ in length"):
        agreement([[1, 2]], [[1]])


def test_prompts_and_continuations_on_stories260k(stories260k, assets, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(stories260k)
    model = AutoModelForCausalLM.from_pretrained(stories260k).eval()
    text = (assets / "data" / "tinystories_2mib.txt").read_text(encoding="utf-8")[:20000]
    path = tmp_path / "held_out.txt"
    path.write_text("\n\n".join(s.strip() for s in text.split("<|endoftext|>")), encoding="utf-8")
    prompts = held_out_prompts(path, tokenizer, n=5, prompt_tokens=16)
    assert len(prompts) == 5 and all(len(p) == 16 for p in prompts)
    # Batches with left padding (prompts of unequal length) continue exactly as an uncached argmax loop.
    prompts[1] = prompts[1][:10]
    continuations = greedy_continuations(model, tokenizer, prompts, new_tokens=6, batch_size=3, show_progress=False)
    for prompt, continuation in zip(prompts, continuations):
        ids = torch.tensor([prompt])
        for _ in range(6):
            with torch.no_grad():
                ids = torch.cat([ids, model(ids, use_cache=False).logits[:, -1:].argmax(-1)], dim=1)
        assert continuation == ids[0, len(prompt):].tolist()
    with pytest.raises(ValueError, match=r"held_out.txt: only \d+ documents .* asks for 10000 prompts"):
        held_out_prompts(path, tokenizer, n=10000, prompt_tokens=16)


def test_prompts_split_on_blank_lines_holding_spaces(stories260k, tmp_path):
    """WikiText's blank lines hold a space (" \\n \\n"): each paragraph is still a document of its own."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(stories260k)
    paragraphs = ["Once upon a time there was a little girl named Lily who loved to play in the park every day.",
                  "One day she found a big red ball under a tree and she was very happy to take it home with her.",
                  "Her mom said that they had to find the owner of the ball, so they walked around the whole park."]
    path = tmp_path / "wiki_style.txt"
    path.write_text(" \n = Title = \n \n " + " \n \n ".join(paragraphs) + " \n", encoding="utf-8")
    prompts = held_out_prompts(path, tokenizer, n=3, prompt_tokens=12)
    assert [tokenizer.decode(p, skip_special_tokens=True) for p in prompts] == [
        tokenizer.decode(tokenizer(p)["input_ids"][:12], skip_special_tokens=True) for p in paragraphs]
