"""The hf-arch command end to end on small inputs: every verb runs, bad input exits 2 with a named problem."""

import json
import subprocess
import sys

from pathlib import Path

import pytest

import hf_arch.recipes
from hf_arch.cli import main


def test_variants_lists_every_registered_variant(capsys):
    assert main(["variants"]) == 0
    assert "gated_attention" in capsys.readouterr().out
    assert main(["variants", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {"name": "gated_attention", "model_type": "hfa_gated_attention"}.items() <= rows[0].items()


def test_console_script_is_installed():
    done = subprocess.run([sys.executable, "-m", "hf_arch.cli", "variants"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "hfa_gated_attention" in done.stdout


@pytest.fixture(scope="module")
def converted(stories260k, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "gated"
    assert main(["convert", str(stories260k), str(out), "--granularity", "headwise"]) == 0
    return out


def test_eval_bench_card_train_on_a_converted_model(converted, assets, tmp_path, capsys):
    data = assets / "data"
    capsys.readouterr()
    assert main(["eval", str(converted), "--ppl-file", str(data / "wikitext2_test.txt"), "--ppl-max-tokens", "600",
                 "--tasks", str(data / "arc_easy_test.jsonl"), "--limit", "4", "--json",
                 "--output", str(tmp_path / "eval.json")]) == 0
    results = json.loads(capsys.readouterr().out)
    assert results["perplexity"]["tokens"] == 599 and results["tasks"]["arc_easy_test"]["n"] == 4
    assert json.loads((tmp_path / "eval.json").read_text()) == results

    assert main(["bench", str(converted), "--seq-len", "16", "--decode-tokens", "2", "--repeats", "1", "--json"]) == 0
    bench = json.loads(capsys.readouterr().out)
    assert [r["attn_implementation"] for r in bench["runs"]] == ["eager", "sdpa"]
    assert all(r["forward_s"] > 0 and r["decode_tokens_per_s"] > 0 for r in bench["runs"])

    assert main(["card", str(converted)]) == 0
    card = (converted / "README.md").read_text()
    assert "hfa_gated_attention" in card and "stories260K" in card
    assert main(["card", str(converted)]) == 2  # refuses to overwrite
    assert "overwrite" in capsys.readouterr().err

    stories = tmp_path / "stories.txt"
    stories.write_text("\n\n".join(["Once upon a time there was a cat. The cat was happy."] * 60))
    recipe = Path(hf_arch.recipes.__file__).parent / "configs" / "gated_attention_tinystories.yaml"
    assert main(["train", str(recipe), f"model={converted}", f"output_dir={tmp_path / 'ft'}",
                 f"data.train_file={stories}", "data.document_separator=null", "data.drop_last_document=false",
                 "data.block_size=32", "training.max_steps=2", "training.per_device_train_batch_size=2",
                 "training.logging_steps=1"]) == 0
    out = capsys.readouterr().out
    summary = json.loads(out[out.index("{\n"):])  # Trainer prints its own log dicts before ours
    assert summary["steps"] == 2 and summary["mode"] == "new_params"
    assert (tmp_path / "ft" / "final" / "model.safetensors").is_file()


def test_eval_takes_lm_eval_task_names_and_paths(stories260k, assets, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_ARCH_ASSETS", str(assets))
    capsys.readouterr()
    assert main(["eval", str(stories260k), "--tasks", "piqa", "arc_easy", "winogrande",
                 str(assets / "data/arc_easy_test.jsonl"), "--limit", "2", "--json"]) == 0
    tasks = json.loads(capsys.readouterr().out)["tasks"]
    assert list(tasks) == ["piqa", "arc_easy", "winogrande", "arc_easy_test"]
    assert all(r["n"] == 2 for r in tasks.values())
    assert {k: v for k, v in tasks["arc_easy"].items() if k != "task"} == \
        {k: v for k, v in tasks["arc_easy_test"].items() if k != "task"}

    # an unknown name that is no file: exit 2 naming it and the known names, before any model is loaded
    assert main(["eval", str(tmp_path / "no-model"), "--tasks", "piqa", "hellaswag"]) == 2
    err = capsys.readouterr().err
    assert "'hellaswag'" in err and "piqa, arc_easy, winogrande" in err


def test_bad_input_exits_2_with_named_problem(tmp_path, capsys):
    assert main(["convert", str(tmp_path / "missing"), str(tmp_path / "out")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["train", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="give --ppl-file"):
        main(["eval", str(tmp_path)])
    assert main(["eval", str(tmp_path), "--ppl-file", str(tmp_path / "x.txt")]) == 2
    assert "config.json" in capsys.readouterr().err
    (tmp_path / "config.json").write_text("{}")
    assert main(["push", str(tmp_path), "me/model"]) == 2
    assert "weights" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["convert", "a", "b", "--to-nowhere"])


def test_convert_flags_go_to_the_registered_conversion(stories260k, tmp_path, capsys):
    """The CLI builds the options of whatever --to names from the flags given (its defaults otherwise), refuses a flag
    its target does not take by name, and runs a conversion another package registered."""
    from hf_arch.conversion import CONVERSIONS, register_conversion
    from hf_arch.conversion.gate_insertion import GateInsertionOptions, insert_gates

    assert main(["convert", str(stories260k), str(tmp_path / "x"), "--to", "moe", "--slots", "8"]) == 2
    assert "--slots does not apply to --to moe" in capsys.readouterr().err
    assert main(["convert", str(stories260k), str(tmp_path / "x"), "--to", "gla", "--method", "mamba_init"]) == 2
    assert "--to gla takes --method liger | lolcats | still | lizard, not 'mamba_init'" in capsys.readouterr().err
    seen = []

    def headwise_gates(source, options):
        seen.append(options)
        return insert_gates(source, options)

    register_conversion("test_headwise_gates", GateInsertionOptions, headwise_gates, granularity="headwise")
    try:
        out = tmp_path / "gated"
        assert main(["convert", str(stories260k), str(out), "--to", "test_headwise_gates", "--gate-rank", "4",
                     "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["options"]["gate_rank"] == 4
        assert (seen[0].granularity, seen[0].gate_rank, seen[0].gate_init) == ("headwise", 4, "identity")
    finally:
        del CONVERSIONS["test_headwise_gates"]


def test_eval_diagnostics_and_histogram_plot(converted, assets, tmp_path, capsys):
    capsys.readouterr()
    plot = tmp_path / "gates.png"
    assert main(["eval", str(converted), "--ppl-file", str(assets / "data/tinystories_2mib.txt"),
                 "--ppl-max-tokens", "300", "--diagnostics", "--diagnostics-tokens", "64", "--plot", str(plot),
                 "--json"]) == 0
    diagnostics = json.loads(capsys.readouterr().out)["diagnostics"]
    assert diagnostics["tokens"] == 64 and len(diagnostics["sink_share_per_layer"]) == 5
    assert diagnostics["gate_mean"] == 1.0  # freshly converted: identity gates
    assert plot.stat().st_size > 0
