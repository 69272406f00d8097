"""Old checkpoints keep loading: every fixture in tests/fixtures/compat (written by an earlier release with
make_compat_fixtures.py: save_pretrained of every model type and composition, and every conversion kind) loads with
the same logits (≤ 1e-6) and an equivalent config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

import hf_arch  # noqa: F401  (registers the model types)
from hf_arch.configuration import RETIRED_FIELDS

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "compat"
CASES = sorted(p.name for p in FIXTURES.iterdir() if (p / "expected.safetensors").exists())
# Bookkeeping a release writes that says nothing about the model.
_RELEASE_FIELDS = {"transformers_version", "dtype", "torch_dtype", "architectures", "auto_map"}


def test_fixtures_cover_every_model_type_and_conversion_kind():
    from hf_arch.conversion.api import CONVERSIONS

    saved_types = {json.loads((FIXTURES / c / "config.json").read_text())["model_type"] for c in CASES
                   if c.startswith("saved__")}
    assert saved_types == {hf_arch.get_variant(v).model_type for v in hf_arch.VARIANTS}
    kinds = {json.loads((FIXTURES / c / "hf_arch_conversion.json").read_text())["variant"] for c in CASES
             if c.startswith("converted__")}
    assert kinds == set(CONVERSIONS)


@pytest.mark.parametrize("case", CASES)
@torch.no_grad()
def test_old_checkpoint_loads_with_identical_logits_and_config(case):
    directory = FIXTURES / case
    expected = load_file(str(directory / "expected.safetensors"))
    model = AutoModelForCausalLM.from_pretrained(directory).eval()
    logits = model(expected["input_ids"], attention_mask=expected["attention_mask"], use_cache=False).logits
    torch.testing.assert_close(logits.float(), expected["logits"], rtol=0, atol=1e-6)

    stored = json.loads((directory / "config.json").read_text())
    reloaded = AutoConfig.from_pretrained(directory).to_dict()
    for key, value in stored.items():
        if key in _RELEASE_FIELDS:
            continue
        if key in RETIRED_FIELDS:  # never read by any release: dropped on load, by design
            assert key not in reloaded, f"{case}: retired field {key!r} is carried forward"
            continue
        assert key in reloaded, f"{case}: config field {key!r} is no longer read back"
        assert reloaded[key] == value, f"{case}: config field {key!r} reads back as {reloaded[key]!r}, saved {value!r}"
