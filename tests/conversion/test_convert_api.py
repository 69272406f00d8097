"""convert(): real checkpoint in, complete output dir out; bad input refused with nothing left behind."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, LlamaConfig

import hf_arch
from hf_arch.cli import main as cli_main
from hf_arch.conversion import RECORD_FILE, convert

STORY_PREFIX = "Once upon a time, there was a little girl named Lily. She loved to play outside in the park."


@pytest.mark.parametrize("granularity", ["headwise", "elementwise"])
def test_convert_stories260k_keeps_logits_and_greedy_story(stories260k, tmp_path, granularity):
    out = tmp_path / "gated"
    result = convert(stories260k, out, granularity=granularity)
    assert result.max_abs_logit_diff is not None and result.max_abs_logit_diff <= 1e-5
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json", RECORD_FILE} <= names
    record = json.loads((out / RECORD_FILE).read_text())
    assert record["source"] == str(stories260k) and record["source_model_type"] == "llama"
    assert record["options"]["granularity"] == granularity
    assert record["versions"]["transformers"] and record["new_parameters"]
    assert not [p for p in tmp_path.iterdir() if "partial" in p.name]

    source = AutoModelForCausalLM.from_pretrained(stories260k, dtype=torch.float32).eval()
    target = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert target.config.model_type == "hfa_gated_attention"
    ids = torch.randint(0, 512, (3, 100), generator=torch.Generator().manual_seed(3))
    assert (source(ids).logits - target(ids).logits).abs().max().item() <= 1e-5
    tok = AutoTokenizer.from_pretrained(out)
    story = target.generate(torch.tensor([[1]]), max_new_tokens=40, do_sample=False, pad_token_id=0)
    assert tok.decode(story[0], skip_special_tokens=True).startswith(STORY_PREFIX)


def test_cli_convert_and_overwrite_rules(stories260k, tmp_path, capsys):
    out = tmp_path / "gated"
    assert cli_main(["convert", str(stories260k), str(out), "--granularity", "headwise", "--no-remote-code"]) == 0
    assert "max |Δlogit|" in capsys.readouterr().out
    marker = out / "config.json"
    before = marker.read_text()
    assert cli_main(["convert", str(stories260k), str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert marker.read_text() == before  # refused: untouched
    assert cli_main(["convert", str(stories260k), str(out), "--overwrite", "--gate-bias", "--no-remote-code"]) == 0
    assert json.loads(marker.read_text())["attn_output_gate_bias"] is True


def test_interrupted_conversion_leaves_nothing(stories260k, tmp_path, monkeypatch):
    out = tmp_path / "gated"

    def explode(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(hf_arch.GatedAttentionForCausalLM, "save_pretrained", explode)
    with pytest.raises(KeyboardInterrupt):
        convert(stories260k, out)
    assert list(tmp_path.iterdir()) == []


def test_bad_sources_get_clear_errors(tmp_path, stories260k):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        convert(tmp_path / "nope", tmp_path / "out")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="config.json is missing"):
        convert(empty, tmp_path / "out")

    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "config.json").write_text((stories260k / "config.json").read_text())
    data = (stories260k / "model.safetensors").read_bytes()
    (corrupt / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="Corrupt safetensors file .*model.safetensors"):
        convert(corrupt, tmp_path / "out")

    gpt2 = tmp_path / "gpt2"
    AutoModelForCausalLM.from_config(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50)).save_pretrained(gpt2)
    with pytest.raises(ValueError, match="Unsupported source architecture 'gpt2'"):
        convert(gpt2, tmp_path / "out")
    with pytest.raises(ValueError, match="Unknown option"):
        convert(stories260k, tmp_path / "out", window=4)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("remote_code", [True, False])
def test_convert_writes_remote_code_once_or_not_at_all(tmp_path, monkeypatch, remote_code):
    """The save writes the flat remote-code files (every hf-arch save does); convert adds no second export, and
    ``remote_code=False`` (``--no-remote-code``) still leaves them and the auto_map out."""
    from hf_arch import remote_code as remote_code_module

    exports = []
    export = remote_code_module.export_remote_code
    monkeypatch.setattr(remote_code_module, "export_remote_code", lambda d: exports.append(d) or export(d))
    src = tmp_path / "llama"
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    AutoModelForCausalLM.from_config(config).save_pretrained(src)
    convert(src, tmp_path / "out", granularity="headwise", remote_code=remote_code)
    assert len(exports) == int(remote_code)
    names = {p.name for p in (tmp_path / "out").iterdir()}
    assert ({remote_code_module.CONFIG_FILENAME, remote_code_module.MODELING_FILENAME} <= names) == remote_code
    assert ("auto_map" in json.loads((tmp_path / "out" / "config.json").read_text())) == remote_code


def test_bf16_source_keeps_dtype(tmp_path):
    src = tmp_path / "llama-bf16"
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=1)
    AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(src)
    result = convert(src, tmp_path / "out", granularity="headwise", remote_code=False)
    assert result.record["dtype"] == "bfloat16"
    assert result.max_abs_logit_diff <= 1e-5
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert loaded.dtype == torch.bfloat16


def test_conversions_with_random_new_parameters_are_reproducible(stories260k, tmp_path):
    from safetensors.torch import load_file

    first = convert(stories260k, tmp_path / "a", to="gated_deltanet", method="mamba_init")
    torch.manual_seed(123)
    expected = torch.rand(1)
    torch.manual_seed(123)
    second = convert(stories260k, tmp_path / "b", to="gated_deltanet", method="mamba_init")
    assert torch.equal(torch.rand(1), expected)  # the caller's RNG stream is left where it was
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert first.record["max_abs_logit_diff"] == second.record["max_abs_logit_diff"] > 0
