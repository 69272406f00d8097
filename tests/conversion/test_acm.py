"""``--to acm`` (issue 21 item 5): the neuron split with every learner running is the dense model; the distillation
makes prefixes approximate the FFN and the gate run fewer learners; bad input is refused by name."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_arch.cli import main
from hf_arch.conversion import max_abs_logit_diff
from hf_arch.conversion.acm import ACMConversionOptions, acmize


@pytest.fixture(scope="module")
def stories(stories260k, assets):
    source = AutoModelForCausalLM.from_pretrained(stories260k, dtype=torch.float32).eval()
    text = (assets / "data" / "tinystories_2mib.txt").read_text(encoding="utf-8")
    tokenizer = AutoTokenizer.from_pretrained(stories260k)
    calibration = tokenizer(text[:60000], return_tensors="pt").input_ids[:, :4096].view(8, 512)
    held_out = tokenizer(text[-20000:], return_tensors="pt").input_ids[:, :2048].view(8, 256)
    return source, calibration, held_out


def test_every_learner_running_is_the_dense_model(stories):
    source, calibration, _ = stories
    target = acmize(source, ACMConversionOptions(learners=4, learner_steps=0, gate_steps=0),
                    calibration_ids=calibration)
    assert target.config.model_type == "hfa_hybrid" and target.config.channel_mixer_types == ["acm"] * 5
    ids = torch.randint(0, source.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(1))
    assert max_abs_logit_diff(source, target, ids) < 1e-4
    # the learners hold the FFN's neurons, most important first: the first prefix is the closest one-learner cut
    report = target.conversion_report["acm_distillation"]
    assert all(r["mean_learners"] == 4.0 and r["full_chain_relative_error"] < 1e-8 for r in report)
    # a learner count that does not divide the FFN's width (stories260K: 172 neurons, 5 learners: 35, 35, 34, 34, 34)
    uneven = acmize(source, ACMConversionOptions(learners=5, learner_steps=0, gate_steps=0),
                    calibration_ids=calibration)
    widths = [learner.gate_proj.out_features for learner in uneven.model.layers[0].mlp.learners]
    assert sum(widths) == source.config.intermediate_size and max(widths) - min(widths) == 1
    assert max_abs_logit_diff(source, uneven, ids) < 1e-4


def test_distillation_trades_learners_for_error_and_the_gate_learns_the_targets(stories):
    source, calibration, held_out = stories
    target = acmize(source, ACMConversionOptions(learners=4, learner_steps=100, gate_steps=200, tolerance=0.1),
                    calibration_ids=calibration)
    report = target.conversion_report["acm_distillation"]
    assert all(r["mean_learners"] < 4.0 for r in report) and min(r["mean_learners"] for r in report) < 3.5
    assert all(r["gate_accuracy"] > 0.5 and r["gated_relative_error"] < 0.2 for r in report), report
    with torch.no_grad():
        losses = [m(held_out, labels=held_out).loss.item() for m in (source, target)]
    assert losses[1] < losses[0] + 1.0, losses  # a usable start for fine-tuning, not a broken model


def test_bad_input_is_refused_by_name(stories, stories260k, assets, tmp_path, capsys):
    source, calibration, _ = stories
    with pytest.raises(ValueError, match="learners \\(1000\\) is larger than intermediate_size"):
        acmize(source, ACMConversionOptions(learners=1000), calibration_ids=calibration)
    with pytest.raises(ValueError, match="tolerance must be in \\(0, 1\\)"):
        acmize(source, ACMConversionOptions(tolerance=1.5), calibration_ids=calibration)
    with pytest.raises(ValueError, match="needs calibration tokens"):
        acmize(source, ACMConversionOptions())
    with pytest.raises(ValueError, match="needs at least 256"):
        acmize(source, ACMConversionOptions(), calibration_ids=calibration[:, :100][:1])
    assert main(["convert", str(stories260k), str(tmp_path / "x"), "--to", "moe", "--learners", "4"]) == 2
    assert "--learners does not apply to --to moe" in capsys.readouterr().err


def test_cli_writes_a_loadable_acm_checkpoint(stories260k, assets, tmp_path):
    out = tmp_path / "acm"
    assert main(["convert", str(stories260k), str(out), "--to", "acm", "--learners", "4", "--learner-steps", "20",
                 "--gate-steps", "20", "--compute-loss-weight", "0.05",
                 "--calibration-file", str(assets / "data" / "tinystories_2mib.txt")]) == 0
    record = json.loads((out / "hf_arch_conversion.json").read_text())
    assert len(record["report"]["acm_distillation"]) == 5
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(model.model.layers[0].mlp).__name__ == "AdaptiveComputationModule"
    assert model.config.mixer_options["acm"] == {"learners": 4, "compute_loss_weight": 0.05}
    assert model.model.layers[0].mlp.compute_loss_weight == 0.05
