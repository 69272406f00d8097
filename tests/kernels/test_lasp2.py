"""LASP-2 sequence parallelism of the recurrent ops: with 2 and 4 processes (gloo, CPU), each rank's output, the final
state and every gradient equal the single-process run (fp64: ≤ 1e-10; the gated delta rule ≤ 1e-5, its chunk kernel computes parts in fp32 even for fp64 inputs); bad splits are refused by name."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hf_arch.kernels.lasp2 import chunk_bounds, sequence_parallel

WORKER = Path(__file__).with_name("lasp2_worker.py")
# fp64 throughout, except our gated delta rule chunk kernel, which rounds parts to fp32 (its own output for a prefix
# of the same inputs differs by ~2e-8 from the whole run's), so its ranks carry that rounding.
TOLERANCE = {"gla": 1e-10, "lightning": 1e-10, "kda": 1e-10, "gated_delta_rule": 1e-5}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_ranks(script: Path, world: int, out: Path, timeout: float = 300) -> list[dict]:
    """Run ``script OUT`` once per rank (torch.distributed's env:// rendezvous) and read ``OUT/rank{r}.json``."""
    port = free_port()
    procs = []
    for rank in range(world):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, str(script), str(out)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = []
    try:
        for proc in procs:
            logs.append(proc.communicate(timeout=timeout)[0])
    finally:
        for proc in procs:
            proc.kill()
    for rank, (proc, log) in enumerate(zip(procs, logs)):
        assert proc.returncode == 0, f"rank {rank} failed:\n{log[-4000:]}"
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]


def accelerate_launch(script: Path, *args: str, timeout: float = 600) -> None:
    """``accelerate launch`` of ``script *args`` on 2 CPU processes (gloo); fails with the processes' output."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
               str(free_port()), str(script), *args]
    done = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, f"accelerate launch {args} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_ranks_equal_the_single_process_run(tmp_path, world):
    reports = launch_ranks(WORKER, world, tmp_path)
    for rank, report in enumerate(reports):
        assert set(report) == {"gla", "lightning", "gated_delta_rule", "kda"}
        for case, result in report.items():
            where = f"{case}, rank {rank} of {world}"
            assert result["output_scale"] > 0.1, where  # a real output, not zeros
            tolerance = TOLERANCE[case]
            assert result["output"] <= tolerance, where
            assert result["final_state"] <= tolerance, where
            assert set(result["grads"]) >= {"q", "k", "v", "initial_state"}, where
            for name, diff in result["grads"].items():
                assert diff <= tolerance, f"{where}: d{name} differs by {diff}"


def test_chunk_bounds_split_evenly_and_refuse_bad_splits():
    assert chunk_bounds(12, 3) == [(0, 4), (4, 8), (8, 12)]
    with pytest.raises(ValueError, match="sequence length 10 is not divisible by the world size 4"):
        chunk_bounds(10, 4)
    with pytest.raises(ValueError, match="3 tokens cannot be split across 4 ranks"):
        chunk_bounds(3, 4)


def test_sequence_parallel_needs_an_initialised_process_group():
    with pytest.raises(RuntimeError, match="torch.distributed is not initialised"):
        with sequence_parallel():
            pass


def test_ops_outside_a_plan_are_untouched():
    from hf_arch.kernels import ops

    q, k, v = (torch.randn(1, 8, 2, 4) for _ in range(3))
    g = torch.zeros(1, 8, 2, 4)
    o, _ = ops.gla(q, k, v, g)
    assert o.shape == (1, 8, 2, 4)
