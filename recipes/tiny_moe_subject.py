"""A small transformers-native MoE to try expert-level methods on (``hf-arch bench modes --train-tiny-qwen3-moe DIR``):
a Qwen3-MoE (transformers' own class, no hf-arch code in it) trained from scratch on TinyStories, with the stories it
never saw written beside it for evaluation.

The stories are split as ``bench scratch`` splits them (the last 5% held out); the model (hidden 64, 4 layers, 8
experts of width 64, top-2, the stories260K tokenizer) trains with the Trainer for ``steps`` steps of 16 × 256 tokens
and is saved with its tokenizer to ``DIR``; ``DIR/train.txt`` and ``DIR/heldout.txt`` hold the two sides' text
(calibrate on the first, evaluate on the second).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from .recovery_benchmark import _assets
from .scratch_comparison import STORIES_FILE, STORY_SEPARATOR, TOKENIZER_DIR, BlockStream, load_token_data

__all__ = ["train_tiny_qwen3_moe"]


def train_tiny_qwen3_moe(out: Path, steps: int = 400, seed: int = 0) -> Path:
    from transformers import AutoTokenizer, Qwen3MoeConfig, Qwen3MoeForCausalLM, Trainer, TrainingArguments
    from transformers import default_data_collator, set_seed

    out = Path(out)
    assets = _assets()
    tokenizer = AutoTokenizer.from_pretrained(assets / TOKENIZER_DIR)
    tokenizer.model_max_length = 10**9
    data = load_token_data(assets, tokenizer, 256, 0.05)
    stories = (assets / STORIES_FILE).read_text(encoding="utf-8").split(STORY_SEPARATOR)[:-1]  # last one is cut
    held = max(1, round(len(stories) * 0.05))
    set_seed(seed)
    config = Qwen3MoeConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, moe_intermediate_size=64,
                            num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                            num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, max_position_embeddings=512,
                            output_router_logits=True, router_aux_loss_coef=0.01, tie_word_embeddings=True,
                            pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id)
    model = Qwen3MoeForCausalLM(config)
    stream = data.train_blocks[torch.randperm(len(data.train_blocks), generator=torch.Generator().manual_seed(seed))]
    stream = stream.repeat(steps * 16 // len(stream) + 1, 1)[: steps * 16]
    with tempfile.TemporaryDirectory(prefix="hfa-tiny-moe-") as work:
        args = TrainingArguments(output_dir=work, max_steps=steps, per_device_train_batch_size=16, learning_rate=3e-3,
                                 warmup_steps=steps // 20, lr_scheduler_type="cosine", weight_decay=0.1,
                                 report_to=[], save_strategy="no", use_cpu=True, seed=seed, logging_steps=50)
        Trainer(model=model, args=args, train_dataset=BlockStream(stream), data_collator=default_data_collator).train()
    model.config.output_router_logits = False
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "train.txt").write_text(STORY_SEPARATOR.join(stories[:-held]), encoding="utf-8")
    (out / "heldout.txt").write_text(STORY_SEPARATOR.join(stories[-held:]), encoding="utf-8")
    return out
