"""One process of the Trainer test in tests/hf_arch/test_sequence_parallel.py, launched by ``accelerate launch``:
trains a tiny Gated DeltaNet + softmax hybrid for two SGD steps (Adam would amplify fp32 rounding in near-zero
gradients) with ``SequenceParallelTrainer`` on the
processes' batches, either sequence-parallel (``sp``) or plain data-parallel (``ddp``), and saves the trained weights
(rank 0) to ``OUT/MODE.pt``."""

from __future__ import annotations

import sys

import torch
from transformers import AutoModelForCausalLM, TrainingArguments

import hf_arch
from hf_arch.sequence_parallel import SequenceParallelTrainer


def main(out: str, mode: str) -> None:
    torch.manual_seed(0)
    config = hf_arch.GatedDeltaNetConfig(
        vocab_size=96, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
        num_hidden_layers=2, layer_types=["linear_attention", "full_attention"], max_position_embeddings=256)
    model = AutoModelForCausalLM.from_config(config)
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    rows = torch.randint(0, 96, (8, 32), generator=torch.Generator().manual_seed(1))  # fixed-length packed blocks
    dataset = [{"input_ids": r, "labels": r.clone()} for r in rows]
    args = TrainingArguments(output_dir=f"{out}/{mode}", per_device_train_batch_size=2, max_steps=2, learning_rate=0.5,
                             optim="sgd",
                             lr_scheduler_type="constant", report_to=[], save_strategy="no", use_cpu=True, seed=0,
                             logging_steps=1, disable_tqdm=True, average_tokens_across_devices=False)
    trainer = SequenceParallelTrainer(model=model, args=args, train_dataset=dataset,
                                      sequence_parallel_size=2 if mode == "sp" else 1)
    result = trainer.train()
    if trainer.args.process_index == 0:
        torch.save({"state": {k: v.detach().clone() for k, v in model.state_dict().items()}, "initial": initial,
                    "loss": result.training_loss,
                    "split_batches": getattr(trainer, "sequence_parallel_batches", 0), "world": trainer.args.world_size}, f"{out}/{mode}.pt")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
