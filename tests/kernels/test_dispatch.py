"""Backend selection: per call from the device, overridable by argument or env var, unknown names refused."""

import logging

import pytest
import torch

from hf_arch.kernels import dispatch


def _impls():
    return {"torch": lambda: "torch", "naive": lambda: "naive"}


def test_cpu_default_is_torch_and_logged_once(caplog):
    dispatch._logged.clear()
    with caplog.at_level(logging.INFO, logger="hf_arch.kernels"):
        for _ in range(3):
            assert dispatch.select_backend("op", _impls(), torch.zeros(1))() == "torch"
    assert len([r for r in caplog.records if "using the torch backend" in r.message]) == 1


def test_argument_beats_env_var(monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, "torch")
    assert dispatch.select_backend("op", _impls(), torch.zeros(1))() == "torch"
    assert dispatch.select_backend("op", _impls(), torch.zeros(1), backend="naive")() == "naive"


def test_unknown_backend_is_a_clear_error(monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, "tritn")
    with pytest.raises(ValueError, match="backend 'tritn' is not available .*HF_ARCH_KERNEL_BACKEND"):
        dispatch.select_backend("op", _impls(), torch.zeros(1))
    with pytest.raises(ValueError, match="backend 'triton' is not available .*backend="):
        dispatch.select_backend("op", _impls(), torch.zeros(1), backend="triton")


def test_global_choice_applies_where_an_op_has_it(monkeypatch):
    """HF_ARCH_KERNEL_BACKEND=fla moves the ops fla has; an op without it (sliding window) keeps its default."""
    monkeypatch.setenv(dispatch.ENV_VAR, "fla")
    assert dispatch.select_backend("op", _impls(), torch.zeros(1))() == "torch"
    assert dispatch.select_backend("op", {**_impls(), "fla": lambda: "fla"}, torch.zeros(1))() == "fla"
