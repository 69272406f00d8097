"""hf_arch.hub.push_to_hub (and transformers' own push_to_hub) against a loopback fake Hub."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from hf_arch.hub import NO_TOKEN_MESSAGE, HubPushError, push_to_hub

# The fake Hub lives in tests/model_cards/conftest.py; conftest fixtures are not shared across sibling folders,
# so load that module by path (import-mode=importlib: no package imports between test folders) and re-export.
_spec = importlib.util.spec_from_file_location(
    "_hf_arch_fake_hub", Path(__file__).resolve().parents[1] / "model_cards" / "conftest.py"
)
_fake_hub_module = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = _fake_hub_module  # dataclasses look their module up
_spec.loader.exec_module(_fake_hub_module)
fake_hub = _fake_hub_module.fake_hub
hub_env = _fake_hub_module.hub_env

TOKEN = "hf_fake_token_for_tests"


@pytest.fixture
def saved_model(tiny_gated_model, tmp_path):
    directory = tmp_path / "tiny-gated"
    tiny_gated_model.save_pretrained(directory)
    return directory


def _logits(model):
    input_ids = torch.arange(16).reshape(2, 8) % model.config.vocab_size
    with torch.no_grad():
        return model(input_ids).logits


def test_push_then_load_gives_identical_logits(hub_env, saved_model, tiny_gated_model, monkeypatch):
    from transformers import AutoModelForCausalLM

    (saved_model / ".README.md.abc.tmp").write_text("partial")  # temp / checkpoint files are not uploaded
    (saved_model / "checkpoint-10").mkdir()
    (saved_model / "checkpoint-10" / "optimizer.pt").write_bytes(b"x")

    url = push_to_hub(saved_model, "fake-user/tiny-gated", token=TOKEN)
    assert url.startswith(f"{hub_env}/fake-user/tiny-gated/commit/")
    files = hub_env.files("fake-user/tiny-gated")
    assert sorted(files) == ["README.md", "config.json", "configuration_hf_arch.py", "generation_config.json",
                             "model.safetensors", "modeling_hf_arch.py"]  # the save wrote the remote code
    assert files["model.safetensors"] == (saved_model / "model.safetensors").read_bytes()
    assert b"base_model" not in files["README.md"] and b"- hf-arch" in files["README.md"]
    assert all(r.authorization == f"Bearer {TOKEN}" for r in hub_env.requests if r.method == "POST"
               and "validate-yaml" not in r.path)

    loaded = AutoModelForCausalLM.from_pretrained("fake-user/tiny-gated").eval()
    assert type(loaded) is type(tiny_gated_model)
    assert torch.equal(_logits(loaded), _logits(tiny_gated_model))
    assert any(r.path.endswith("/model.safetensors") and "/resolve/" in r.path for r in hub_env.requests)
    assert not hub_env.unhandled

    # Pushing again with HF_TOKEN from the environment to a branch: repo exists already, README.md is kept.
    monkeypatch.setenv("HF_TOKEN", "hf_env_token")
    push_to_hub(saved_model, "fake-user/tiny-gated", revision="dev", commit_message="again")
    assert hub_env.requests[-1].authorization == "Bearer hf_env_token"
    assert sorted(hub_env.files("fake-user/tiny-gated", "dev")) == sorted(files)
    assert not hub_env.unhandled


def test_transformers_push_to_hub_works_against_fake_hub(hub_env, tiny_gated_model):
    from transformers import AutoModelForCausalLM

    tiny_gated_model.push_to_hub("fake-user/tiny-gated-tf", token=TOKEN)
    assert "model.safetensors" in hub_env.files("fake-user/tiny-gated-tf")
    loaded = AutoModelForCausalLM.from_pretrained("fake-user/tiny-gated-tf").eval()
    assert torch.equal(_logits(loaded), _logits(tiny_gated_model))
    assert not hub_env.unhandled


def test_transformers_pushes_carry_remote_code(hub_env, tiny_gated_model, tmp_path):
    """``push_to_hub`` and ``save_pretrained(push_to_hub=True)`` (which uploads before it returns) both upload the flat
    remote-code files and a config.json with the auto_map."""
    import json

    from hf_arch.remote_code import CONFIG_FILENAME, MODELING_FILENAME, auto_map_for

    tiny_gated_model.push_to_hub("fake-user/pushed", token=TOKEN)
    tiny_gated_model.save_pretrained(tmp_path / "saved", push_to_hub=True, repo_id="fake-user/saved", token=TOKEN)
    for repo_id in ("fake-user/pushed", "fake-user/saved"):
        files = hub_env.files(repo_id)
        assert {CONFIG_FILENAME, MODELING_FILENAME, "config.json", "model.safetensors"} <= set(files), repo_id
        assert json.loads(files["config.json"])["auto_map"] == auto_map_for("gated_attention")
    local = {p.name: p.read_bytes() for p in (tmp_path / "saved").iterdir()}
    assert {name: files[name] for name in (CONFIG_FILENAME, MODELING_FILENAME, "config.json")} == \
        {name: local[name] for name in (CONFIG_FILENAME, MODELING_FILENAME, "config.json")}
    assert "_upload_modified_files" not in vars(tiny_gated_model)  # the per-call upload hook is gone again
    assert not hub_env.unhandled


def test_push_without_token_fails_before_any_request(hub_env, saved_model):
    with pytest.raises(HubPushError) as error:
        push_to_hub(saved_model, "fake-user/tiny-gated")
    assert str(error.value) == NO_TOKEN_MESSAGE
    assert hub_env.requests == []
    assert not (saved_model / "README.md").exists()  # nothing written either


def test_push_without_config_fails_clearly(hub_env, tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="config.json"):
        push_to_hub(tmp_path, "fake-user/x", token=TOKEN)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        push_to_hub(tmp_path / "missing", "fake-user/x", token=TOKEN)
    assert hub_env.requests == []


def test_push_without_weights_fails_clearly(hub_env, saved_model):
    (saved_model / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no weights"):
        push_to_hub(saved_model, "fake-user/x", token=TOKEN)
    assert hub_env.requests == []


def test_fake_hub_rejects_writes_without_token(hub_env):
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    with pytest.raises(HfHubHTTPError) as error:
        HfApi(endpoint=str(hub_env)).create_repo("fake-user/anon", token=False)
    assert error.value.response.status_code == 401
    assert hub_env.requests[-1].authorization is None


def test_convert_from_a_hub_id_then_push_the_result(hub_env, stories260k, tmp_path):
    """SRC may be a Hub id: the source is downloaded through the (fake) Hub, converted, verified and pushed back."""
    from huggingface_hub import HfApi
    from transformers import AutoModelForCausalLM

    from hf_arch.conversion import convert

    api = HfApi(token=TOKEN)
    api.create_repo("karpathy-fake/stories260K")
    api.upload_folder(folder_path=str(stories260k), repo_id="karpathy-fake/stories260K", ignore_patterns=["raw/*"])
    result = convert("karpathy-fake/stories260K", tmp_path / "gated", granularity="headwise")
    assert result.max_abs_logit_diff <= 1e-5
    assert result.record["source"] == "karpathy-fake/stories260K"
    push_to_hub(tmp_path / "gated", "fake-user/stories260K-gated", token=TOKEN)
    reloaded = AutoModelForCausalLM.from_pretrained("fake-user/stories260K-gated")
    source = AutoModelForCausalLM.from_pretrained(stories260k)
    assert reloaded.config.model_type == "hfa_gated_attention"
    assert (_logits(reloaded) - _logits(source)).abs().max() <= 1e-5
    assert "base_model: karpathy-fake/stories260K" in (tmp_path / "gated" / "README.md").read_text()
