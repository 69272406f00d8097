"""One rank of the transformers-EP test in tests/hf_arch/test_expert_parallel.py: loads a native export of an hf-arch
MoE with transformers' own expert parallelism (``DistributedConfig(tp_plan="auto", enable_expert_parallel=True)``)
and writes its logits and how many experts this rank's table holds to ``OUT/rank{r}.json``."""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM
from transformers.distributed import DistributedConfig


def main(model_dir: str, out: str) -> None:
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, distributed_config=DistributedConfig(tp_plan="auto", enable_expert_parallel=True)).eval()
    rank = dist.get_rank()
    table = model.model.layers[0].mlp.experts.gate_up_proj
    local = table.to_local() if hasattr(table, "to_local") else table
    ids = torch.tensor(json.loads(os.environ["EP_INPUT_IDS"]))
    with torch.no_grad():
        logits = model(ids).logits
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"logits": logits.tolist(), "local_experts": local.shape[0], "distributed": dist.is_initialized()},
                  f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
