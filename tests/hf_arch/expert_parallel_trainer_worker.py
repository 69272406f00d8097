"""One process of the Trainer test in tests/hf_arch/test_expert_parallel.py, launched by ``accelerate launch``: trains
a tiny MoE for two SGD steps on the processes' batches, with the experts sharded over the two processes (``ep``) or
plain data-parallel (``ddp``), and saves the trained weights (gathered, rank 0) to ``OUT/MODE.pt``."""

from __future__ import annotations

import sys

import torch
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

import hf_arch
from hf_arch.expert_parallel import gather_experts, shard_experts


def main(out: str, mode: str) -> None:
    torch.manual_seed(0)
    config = hf_arch.MoEConfig(vocab_size=71, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, moe_intermediate_size=16, num_experts=4,
                               num_experts_per_tok=2, moe_preset="qwen_moe")
    model = AutoModelForCausalLM.from_config(config)
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    rows = torch.randint(0, 71, (8, 16), generator=torch.Generator().manual_seed(1))
    dataset = [{"input_ids": r, "labels": r.clone()} for r in rows]
    args = TrainingArguments(output_dir=f"{out}/{mode}", per_device_train_batch_size=2, max_steps=2, learning_rate=0.5,
                             optim="sgd", lr_scheduler_type="constant", report_to=[], save_strategy="no",
                             use_cpu=True, seed=0, logging_steps=1, disable_tqdm=True, max_grad_norm=0.0,
                             average_tokens_across_devices=False)
    local_experts = None
    if mode == "ep":
        assert args.world_size == 2  # reading it sets up accelerate's state: the process group exists from here
        shard_experts(model, data_parallel_wrapper=True)
        local_experts = model.model.layers[0].mlp.experts.gate_up_proj.shape[0]
    trainer = Trainer(model=model, args=args, train_dataset=dataset)
    result = trainer.train()
    if mode == "ep":
        gather_experts(model)
    if trainer.args.process_index == 0:
        torch.save({"state": {k: v.detach().clone() for k, v in model.state_dict().items()}, "initial": initial,
                    "loss": result.training_loss, "world": trainer.args.world_size,
                    "local_experts": local_experts}, f"{out}/{mode}.pt")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
