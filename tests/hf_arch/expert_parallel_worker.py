"""One rank of tests/hf_arch/test_expert_parallel.py (RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT set): tiny MoE
models run every rank's batch unsharded in this process (the reference: the mean of the ranks' losses) and this
rank's batch with the experts sharded; writes the largest differences of logits, aux loss and every parameter
gradient to ``OUT/rank{r}.json``."""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM

import hf_arch
from hf_arch.expert_parallel import gather_experts, shard_experts

TINY = dict(vocab_size=71, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2,
            moe_z_loss_coef=0.01, output_router_logits=True)


def models() -> dict:
    return {
        "softmax_topk": hf_arch.MoEConfig(**TINY),
        "qwen_moe_shared": hf_arch.MoEConfig(**TINY, moe_preset="qwen_moe"),
        "moe_plus_plus": hf_arch.MoEConfig(**TINY, moe_preset="moe_plus_plus"),
        "dense_and_sparse": hf_arch.MoEConfig(**TINY, moe_sparse_step=2, moe_router="sigmoid_topk"),
    }


def main(out: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    batches = [torch.randint(0, TINY["vocab_size"], (2, 11), generator=torch.Generator().manual_seed(r))
               for r in range(world)]
    report = {}
    for name, config in models().items():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config).double().train()
        reference_loss = sum(model(input_ids=b, labels=b).loss for b in batches) / world
        reference_loss.backward()
        reference = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        with torch.no_grad():
            mine = model(input_ids=batches[rank], labels=batches[rank])
        model.zero_grad()
        plan = shard_experts(model)
        out_ep = model(input_ids=batches[rank], labels=batches[rank])
        out_ep.loss.backward()
        plan.reduce_gradients()
        diffs, missing = [], []
        for n, p in model.named_parameters():
            ref = reference.get(n)
            if ref is None:
                continue
            if p.grad is None:
                missing.append(n)
                continue
            if n in plan.expert_parameters:
                shard = next(m.shard for m in model.modules() if getattr(m, "shard", None) is not None)
                ref = ref[shard.first:shard.first + shard.count]
            diffs.append(float((p.grad - ref).abs().max() / ref.abs().max().clamp_min(1e-12)))
        sharded_shape = tuple(next(m for m in model.modules() if getattr(m, "shard", None) is not None)
                              .gate_up_proj.shape)
        gather_experts(model)
        with torch.no_grad():
            regathered = model(input_ids=batches[rank]).logits
        report[name] = {
            "logits": float((out_ep.logits.detach() - mine.logits).abs().max()),
            "aux_loss": float((out_ep.aux_loss.detach() - mine.aux_loss).abs()),
            "loss": float((out_ep.loss.detach() - mine.loss).abs()),
            "grad": max(diffs), "parameters": len(diffs), "missing_grads": missing,
            "sharded_experts": sharded_shape[0], "regathered_logits": float((regathered - mine.logits).abs().max()),
        }
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(report, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
