"""Run one worker per rank on this machine (torch.distributed's env:// rendezvous on loopback) and read back what each
wrote: the launcher the parallelism benchmarks share (training itself goes through ``accelerate launch`` /
torchrun; this only times configurations side by side)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

__all__ = ["free_port", "run_ranks"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(module: str, world: int, worker_args: list[str], threads: int, what: str) -> list[dict]:
    """``python -m module --worker-out DIR *worker_args`` once per rank; each writes ``DIR/rank{r}.json``."""
    port = free_port()
    with tempfile.TemporaryDirectory() as out:
        procs = []
        for rank in range(world):
            env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1",
                   "MASTER_PORT": str(port), "OMP_NUM_THREADS": str(threads)}
            procs.append(subprocess.Popen([sys.executable, "-m", module, "--worker-out", out, *worker_args], env=env,
                                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        logs = [p.communicate()[0] for p in procs]
        for rank, (proc, log) in enumerate(zip(procs, logs)):
            if proc.returncode != 0:
                raise RuntimeError(f"{what}: rank {rank} of {world} failed:\n{log[-3000:]}")
        return [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(world)]
