"""One rank of tests/hf_arch/test_sequence_parallel.py (RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT set): each
tiny model runs the whole batch in this process (the reference) and this rank's chunk under sequence parallelism;
writes the largest differences of logits, loss and every parameter gradient (summed over the ranks) to
``OUT/rank{r}.json``."""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM

import hf_arch
from hf_arch.sequence_parallel import all_reduce_gradients, sequence_parallel, sequence_parallel_loss, split_batch

TINY = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=256)


def models() -> dict:
    linear = ["linear_attention"] * 2
    return {
        "gla": hf_arch.GLAConfig(num_hidden_layers=2, layer_types=linear, **TINY),
        "gated_deltanet": hf_arch.GatedDeltaNetConfig(num_hidden_layers=2, layer_types=linear, **TINY),
        "kda": hf_arch.KDAConfig(num_hidden_layers=2, layer_types=linear, **TINY),
        "lightning": hf_arch.LightningConfig(num_hidden_layers=2, layer_types=linear, **TINY),
        # a hybrid: Gated DeltaNet, full softmax attention and a sliding-window softmax layer
        "hybrid": hf_arch.GatedDeltaNetConfig(
            num_hidden_layers=3, layer_types=["linear_attention", "full_attention", "sliding_attention"],
            sliding_window=6, **TINY),
    }


def main(out: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    group = dist.new_group(list(range(world)))
    ids = torch.randint(0, TINY["vocab_size"], (2, 37), generator=torch.Generator().manual_seed(0))  # 37: padded
    report = {}
    for name, config in models().items():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config).double()
        model.train()
        full = model(input_ids=ids, labels=ids, use_cache=False)
        full.loss.backward()
        reference = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad()

        chunk = split_batch({"input_ids": ids}, rank, world)
        with sequence_parallel(group, total_length=chunk["total_length"]):
            loss = sequence_parallel_loss(model, chunk)
            loss.backward()
            logits = model(input_ids=chunk["input_ids"], position_ids=chunk["position_ids"], use_cache=False).logits
        all_reduce_gradients(model, group)
        total = loss.detach().clone()
        dist.all_reduce(total, group=group)
        start = chunk["position_ids"][0, 0].item()
        real = max(0, min(ids.shape[1] - start, logits.shape[1]))  # this chunk's real (unpadded) tokens
        got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        report[name] = {
            "logits": float((logits[:, :real] - full.logits[:, start:start + real]).abs().max()) if real else 0.0,
            "loss": abs(float(total) - float(full.loss)),
            "missing_grads": sorted(set(reference) ^ set(got)),
            "grad": max(float((got[n] - reference[n]).abs().max()) for n in reference),
            "grad_scale": max(float(g.abs().max()) for g in reference.values()),
            "parameters": len(reference),
        }
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(report, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
