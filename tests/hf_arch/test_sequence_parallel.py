"""Sequence parallelism of whole models (LASP-2 / LASP-2H): with 2 and 4 gloo processes, GLA, Gated DeltaNet, KDA,
Lightning and a hybrid with full and sliding-window softmax layers give the single-process logits, loss and every
parameter gradient (fp64); bad input is refused by name."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from hf_arch.sequence_parallel import split_batch

_spec = importlib.util.spec_from_file_location("lasp2_tests", Path(__file__).parents[1] / "kernels" / "test_lasp2.py")
_lasp2_tests = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_lasp2_tests)
launch_ranks = _lasp2_tests.launch_ranks

WORKER = Path(__file__).with_name("sequence_parallel_worker.py")


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_models_equal_the_single_process_run(tmp_path, world):
    reports = launch_ranks(WORKER, world, tmp_path)
    for rank, report in enumerate(reports):
        assert set(report) == {"gla", "gated_deltanet", "kda", "lightning", "hybrid"}
        for name, result in report.items():
            where = f"{name}, rank {rank} of {world}"
            assert result["missing_grads"] == [], where
            assert result["parameters"] >= 10 and result["grad_scale"] > 1e-3, where
            # fp64 models; the GDN chunk kernel and KDA's gates keep parts in fp32, and transformers' reference loss
            # upcasts the logits "to float" (fp32, here a downcast), so those carry fp32 rounding.
            exact = 1e-6 if name in ("gated_deltanet", "kda", "hybrid") else 1e-9
            assert result["logits"] <= exact, f"{where}: logits differ by {result['logits']}"
            assert result["loss"] <= max(exact, 1e-6), f"{where}: loss differs by {result['loss']}"
            assert result["grad"] <= max(exact, 1e-6), f"{where}: gradients differ by {result['grad']}"


def test_split_batch_shifts_before_splitting_and_pads_to_the_world_size():
    ids = torch.arange(10).view(1, 10)
    chunks = [split_batch({"input_ids": ids}, rank, 4) for rank in range(4)]
    assert [c["input_ids"].shape[1] for c in chunks] == [3, 3, 3, 3] and chunks[0]["total_length"] == 12
    assert chunks[1]["position_ids"].tolist() == [[3, 4, 5]]
    assert chunks[0]["shift_labels"].tolist() == [[1, 2, 3]]  # the boundary token's label comes from the next chunk
    assert chunks[3]["shift_labels"].tolist() == [[-100, -100, -100]]  # the last real token and the padding
    assert all(c["num_items"] == 9 for c in chunks)


def test_models_without_support_are_refused_by_name(tiny_gated_model):
    from transformers import LlamaConfig, LlamaForCausalLM

    import hf_arch
    from hf_arch.sequence_parallel import check_sequence_parallel_support

    check_sequence_parallel_support(tiny_gated_model)  # softmax attention (gates are token-wise): supported
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2))
    with pytest.raises(ValueError, match="needs an hf-arch model; LlamaForCausalLM"):
        check_sequence_parallel_support(llama)
    mla = hf_arch.HybridConfig(vocab_size=32, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                               num_attention_heads=4, token_mixer_types=["gated_deltanet", "mla"],
                               linear_attn_type="gated_deltanet",
                               mixer_options={"mla": dict(kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
                                                          v_head_dim=8)})
    from transformers import AutoModelForCausalLM

    with pytest.raises(ValueError, match="not supported by: .*Latent"):
        check_sequence_parallel_support(AutoModelForCausalLM.from_config(mla))



def test_compiled_models_are_refused_and_ops_ignore_plans_in_a_trace(tiny_gated_model, monkeypatch):
    from hf_arch.kernels import lasp2
    from hf_arch.sequence_parallel import sequence_parallel_loss

    plan = lasp2.SequenceParallelPlan(group=None, rank=0, world_size=2)
    token = lasp2._PLAN.set(plan)
    try:
        assert lasp2.active_plan() is plan
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
        assert lasp2.active_plan() is None  # dynamo cannot read a ContextVar: no plan inside a traced graph
        monkeypatch.undo()
        chunk = split_batch({"input_ids": torch.arange(8).view(1, 8)}, 0, 2)
        with pytest.raises(ValueError, match="torch.compile'd forward"):
            sequence_parallel_loss(torch.compile(tiny_gated_model), chunk)
    finally:
        lasp2._PLAN.reset(token)


def test_split_batch_refuses_padded_rows_and_bad_shapes():
    ids = torch.arange(8).view(2, 4)
    with pytest.raises(ValueError, match="attention_mask has zeros"):
        split_batch({"input_ids": ids, "attention_mask": torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])}, 0, 2)
    with pytest.raises(ValueError, match=r"input_ids must be \[batch, tokens\]"):
        split_batch({"input_ids": ids.flatten()}, 0, 2)
    with pytest.raises(ValueError, match="4 tokens cannot be split across 8 ranks"):
        split_batch({"input_ids": ids}, 0, 8)


TRAINER_WORKER = Path(__file__).with_name("sequence_parallel_trainer_worker.py")


def _accelerate_launch(out: Path, mode: str) -> None:
    _lasp2_tests.accelerate_launch(TRAINER_WORKER, str(out), mode)


@pytest.mark.slow
def test_a_trainer_step_under_accelerate_launch_equals_data_parallel_training(tmp_path):
    """Two processes, the same batches: sequence-parallel training (each batch split along the sequence over both
    processes) ends at the weights plain data-parallel training reaches."""
    _accelerate_launch(tmp_path, "sp")
    _accelerate_launch(tmp_path, "ddp")
    sp, ddp = torch.load(tmp_path / "sp.pt"), torch.load(tmp_path / "ddp.pt")
    assert sp["world"] == ddp["world"] == 2
    assert sp["split_batches"] == 4 and ddp["split_batches"] == 0  # 2 steps x both processes' batches, split
    moved = 0.0
    for name, weight in ddp["state"].items():
        assert torch.allclose(sp["state"][name], weight, atol=1e-6, rtol=0), \
            f"{name}: {float((sp['state'][name] - weight).abs().max())}"
        moved = max(moved, float((weight - ddp["initial"][name]).abs().max()))
    assert moved > 1e-2  # the steps changed the weights
    assert abs(sp["loss"] - ddp["loss"]) < 1e-5
