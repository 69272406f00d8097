"""One rank of tests/kernels/test_lasp2.py (launched once per rank with RANK / WORLD_SIZE / MASTER_ADDR /
MASTER_PORT set): runs each op on the whole sequence in this process (the reference) and on this rank's chunk under
``sequence_parallel``, and writes the largest differences of outputs, final states and every gradient to
``OUT/rank{r}.json``."""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist

from hf_arch.kernels import ops
from hf_arch.kernels.kda import kda
from hf_arch.kernels.lasp2 import chunk_bounds, sequence_parallel

B, T, H, K, V = 2, 48, 2, 16, 8


def inputs(case: str, dtype) -> dict:
    g = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype)

    x = {"q": randn(B, T, H, K), "k": randn(B, T, H, K), "v": randn(B, T, H, V),
         "initial_state": randn(B, H, K, V) * 0.5}
    if case == "gla":
        x["g"] = torch.nn.functional.logsigmoid(randn(B, T, H, K)) / 4
    elif case == "lightning":
        x["log_decay"] = -torch.linspace(0.05, 0.5, H, dtype=dtype)
    elif case == "gated_delta_rule":
        x["g"] = torch.nn.functional.logsigmoid(randn(B, T, H))
        x["beta"] = torch.sigmoid(randn(B, T, H))
    elif case == "kda":
        x["g"] = torch.nn.functional.logsigmoid(randn(B, T, H, K)) / 4
        x["beta"] = torch.sigmoid(randn(B, T, H))
    return x


def run(case: str, x: dict):
    common = {"initial_state": x["initial_state"], "output_final_state": True}
    if case == "gla":
        return ops.gla(x["q"], x["k"], x["v"], x["g"], **common)
    if case == "lightning":
        return ops.lightning_attention(x["q"], x["k"], x["v"], x["log_decay"], **common)
    if case == "gated_delta_rule":
        return ops.gated_delta_rule(x["q"], x["k"], x["v"], x["g"], x["beta"], use_qk_l2norm=True, **common)
    return kda(x["q"], x["k"], x["v"], x["g"], x["beta"], use_qk_l2norm=True, **common)


def main(out: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    group = dist.new_group(list(range(world)))  # LASP-2's own group, as beside data parallelism
    start, end = chunk_bounds(T, world)[rank]
    report = {}
    for case in ("gla", "lightning", "gated_delta_rule", "kda"):
        x = inputs(case, torch.float64)
        weights = torch.randn(B, T, H, V, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        final_weights = torch.randn(B, H, K, V, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
        differentiable = [n for n, t in x.items() if t.is_floating_point() and n != "log_decay"]

        full = {n: t.clone().requires_grad_(n in differentiable) for n, t in x.items()}
        o, final = run(case, full)
        ((o * weights).sum() + (final * final_weights).sum()).backward()

        local = {n: (t[:, start:end] if t.dim() >= 3 and t.shape[1] == T and n != "initial_state" else t).clone()
                 for n, t in x.items()}
        local = {n: t.requires_grad_(n in differentiable) for n, t in local.items()}
        with sequence_parallel(group, total_length=T):
            o_sp, final_sp = run(case, local)
            # The whole sequence's loss is the sum of the ranks' losses; the final state's term counted once.
            loss = (o_sp * weights[:, start:end]).sum() + (final_sp * final_weights).sum() / world
            loss.backward()
        grads = {}
        for n in differentiable:
            ref = full[n].grad
            got = local[n].grad
            if n == "initial_state":  # every rank holds a part of its gradient
                got = got.clone()
                dist.all_reduce(got)
            else:
                ref = ref[:, start:end]
            grads[n] = float((got - ref).abs().max())
        report[case] = {"output": float((o_sp - o[:, start:end]).abs().max()),
                        "final_state": float((final_sp - final).abs().max()),
                        "grads": grads, "output_scale": float(o.abs().max())}
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(report, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
