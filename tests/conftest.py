"""Shared fixtures: Hub switched off, a temporary HF_HOME, the shared assets, tiny models."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

# Set before transformers / huggingface_hub / datasets are imported by any test module.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("HF_HOME", tempfile.mkdtemp(prefix="hfarch-hfhome-"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")
# Triton kernels run through the interpreter on this CPU-only machine; it must be chosen before triton is imported.
# On a GPU box, run the suite with TRITON_INTERPRET=0 to exercise the compiled kernels.
os.environ.setdefault("TRITON_INTERPRET", "1")
# New Triton output buffers start as NaN, so an element a kernel forgets to write fails the comparison.
os.environ.setdefault("HF_ARCH_POISON_BUFFERS", "1")
# pytest-xdist (`-n auto` in pyproject): each worker takes an equal share of the cores, so workers do not contend.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    _share = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ.setdefault("OMP_NUM_THREADS", str(_share))
    os.environ.setdefault("MKL_NUM_THREADS", str(_share))

REPO_ROOT = Path(__file__).resolve().parents[1]
ASSETS = Path(os.environ.get("HF_ARCH_ASSETS", REPO_ROOT.parent / "shared" / "assets"))


def require_asset(relative: str) -> Path:
    """Path to a shared asset; fails under CI=true when missing, skips with the reason otherwise."""
    path = ASSETS / relative
    if not path.exists():
        message = f"shared asset {path} is missing (set HF_ARCH_ASSETS to the folder holding models/ and data/)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def assets() -> Path:
    return require_asset("")


@pytest.fixture(scope="session")
def stories260k() -> Path:
    return require_asset("models/stories260K")


@pytest.fixture
def tiny_gated_config():
    import hf_arch

    return hf_arch.GatedAttentionConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )


@pytest.fixture
def tiny_gated_model(tiny_gated_config):
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_gated_config).eval()


class ModelChecks:
    """What every new mixer or router must show on a tiny model: it trains, cached decoding and generation equal the
    full forward, and it survives save / load."""

    @staticmethod
    def trains(model, rows, steps: int = 12, lr: float = 1e-2, drop: float = 0.3) -> list[float]:
        import torch

        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
        losses = []
        for _ in range(steps):
            loss = model(rows, labels=rows).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(float(loss))
        assert all(v == v and abs(v) != float("inf") for v in losses) and losses[-1] < losses[0] - drop, losses
        model.eval()
        return losses

    @staticmethod
    def decodes_like_the_full_forward(model, x, prefix: int) -> None:
        """Prefill ``x[:, :prefix]``, then one token at a time: the logits equal one full forward's; greedy
        generation with the cache equals it without."""
        import torch

        with torch.no_grad():
            full = model(x).logits
            out = model(x[:, :prefix], use_cache=True)
            pieces, cache = [out.logits], out.past_key_values
            for t in range(prefix, x.shape[1]):
                pieces.append(model(x[:, t:t + 1], past_key_values=cache, use_cache=True).logits)
            torch.testing.assert_close(torch.cat(pieces, 1), full, rtol=1e-5, atol=1e-5)
            prompt = x[:, :max(1, prefix - 1)]
            assert torch.equal(model.generate(prompt, max_new_tokens=6, do_sample=False),
                               model.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=False))

    @staticmethod
    def round_trips(model, x, path) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        with torch.no_grad():
            model.save_pretrained(path, remote_code=False)
            torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(path).eval()(x).logits, model(x).logits)


@pytest.fixture
def model_checks() -> type[ModelChecks]:
    return ModelChecks


# The subset CI also runs on the floor of the supported transformers range (`pytest -m floor` in .ci/run): every
# model type's generate / cache / padding / packing / remote code, and transformers' own model tests.
FLOOR_SUBSET = (
    "hf_arch/test_packaging.py",
    "hf_arch/test_generation_cache.py",
    "hf_arch/test_packed_sequences.py",
    "hf_arch/test_checkpoint_compat.py",
    "hf_arch/test_gated_attention_model.py",
    "hf_arch/test_linear_models.py",
    "hf_arch/test_moe_models.py",
    "hf_arch/test_remote_code.py",
    "hf_arch/layers/",
    "conversion/test_gate_insertion.py",
)


def pytest_collection_modifyitems(config, items):
    tests_root = Path(__file__).resolve().parent
    for item in items:
        relative = Path(item.fspath).resolve().relative_to(tests_root).as_posix()
        if relative.startswith(FLOOR_SUBSET):
            item.add_marker(pytest.mark.floor)

