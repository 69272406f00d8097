"""Expert parallelism (issue 21 item 6): with 2 and 4 gloo processes, each holding E / W experts, the logits, the
loss, the auxiliary loss and every parameter gradient equal the unsharded model's (fp64), for softmax and sigmoid
routers, a shared expert, MoE++ zero-computation experts and dense layers between sparse ones; the tables gather
back; bad input is refused by name."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

_spec = importlib.util.spec_from_file_location("lasp2_tests", Path(__file__).parents[1] / "kernels" / "test_lasp2.py")
_lasp2_tests = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_lasp2_tests)
launch_ranks = _lasp2_tests.launch_ranks

WORKER = Path(__file__).with_name("expert_parallel_worker.py")


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_sharded_experts_equal_the_unsharded_model(tmp_path, world):
    reports = launch_ranks(WORKER, world, tmp_path)
    for rank, report in enumerate(reports):
        assert set(report) == {"softmax_topk", "qwen_moe_shared", "moe_plus_plus", "dense_and_sparse"}
        for name, result in report.items():
            where = f"{name}, rank {rank} of {world}"
            assert result["sharded_experts"] == 4 // world, where
            assert result["missing_grads"] == [] and result["parameters"] >= 10, where
            assert result["logits"] <= 1e-10 and result["loss"] <= 1e-10, where
            assert result["aux_loss"] <= 1e-10, where
            assert result["grad"] <= 1e-9, f"{where}: gradients differ by {result['grad']}"
            assert result["regathered_logits"] <= 1e-10, where


def test_bad_input_is_refused_by_name(tiny_gated_model, monkeypatch):
    import torch.distributed as dist

    import hf_arch
    from hf_arch.expert_parallel import shard_experts

    with pytest.raises(RuntimeError, match="needs an initialised torch.distributed process group"):
        shard_experts(tiny_gated_model)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 3)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 0)
    with pytest.raises(ValueError, match="has no hf-arch expert tables"):
        shard_experts(tiny_gated_model)
    torch.manual_seed(0)
    moe = hf_arch.MoEForCausalLM(hf_arch.MoEConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
                                                   num_hidden_layers=1, num_attention_heads=2, num_experts=4,
                                                   moe_intermediate_size=8))
    with pytest.raises(ValueError, match="4 experts do not divide over 3 processes"):
        shard_experts(moe)


TRAINER_WORKER = Path(__file__).with_name("expert_parallel_trainer_worker.py")


def _accelerate_launch(out: Path, mode: str) -> None:
    _lasp2_tests.accelerate_launch(TRAINER_WORKER, str(out), mode)


@pytest.mark.slow
def test_a_trainer_step_under_accelerate_launch_equals_data_parallel_training(tmp_path):
    """Two processes, the same batches: training with the experts sharded over both processes ends at the weights
    plain data-parallel training reaches."""
    _accelerate_launch(tmp_path, "ep")
    _accelerate_launch(tmp_path, "ddp")
    ep, ddp = torch.load(tmp_path / "ep.pt"), torch.load(tmp_path / "ddp.pt")
    assert ep["world"] == ddp["world"] == 2 and ep["local_experts"] == 2  # 2 of 4 experts per process
    moved = 0.0
    for name, weight in ddp["state"].items():
        assert ep["state"][name].shape == weight.shape, name  # gathered back to the full tables
        assert torch.allclose(ep["state"][name], weight, atol=1e-6, rtol=0), \
            f"{name}: {float((ep['state'][name] - weight).abs().max())}"
        moved = max(moved, float((weight - ddp["initial"][name]).abs().max()))
    assert moved > 1e-2
    assert abs(ep["loss"] - ddp["loss"]) < 1e-5


@pytest.mark.slow
def test_transformers_expert_parallelism_runs_a_native_export_of_our_moe(tmp_path):
    """The existing engine: an hf-arch MoE exported as transformers' own Mixtral loads with transformers' expert
    parallelism (2 gloo processes, experts sharded by its plan) and gives our model's logits."""
    import json
    import os
    import subprocess
    import sys

    from transformers import AutoModelForCausalLM

    import hf_arch
    from hf_arch.cli import main

    torch.manual_seed(0)
    config = hf_arch.MoEConfig(vocab_size=71, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, moe_intermediate_size=16, num_experts=4,
                               num_experts_per_tok=2)
    ours = AutoModelForCausalLM.from_config(config).eval()
    ours.save_pretrained(tmp_path / "ours", remote_code=False)
    assert main(["export", "--native", str(tmp_path / "ours"), str(tmp_path / "native")]) == 0
    assert json.loads((tmp_path / "native" / "config.json").read_text())["model_type"] in ("mixtral", "qwen3_moe")
    ids = torch.randint(0, 71, (2, 9), generator=torch.Generator().manual_seed(3))
    port = _lasp2_tests.free_port()
    worker = Path(__file__).with_name("transformers_expert_parallel_worker.py")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
               str(worker), str(tmp_path / "native"), str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "EP_INPUT_IDS": json.dumps(ids.tolist())}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"torchrun failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    with torch.no_grad():
        expected = ours(ids).logits
    for rank in range(2):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result["distributed"] and result["local_experts"] == 2  # transformers' plan sharded the 4 experts
        torch.testing.assert_close(torch.tensor(result["logits"]), expected, rtol=1e-4, atol=1e-4)
