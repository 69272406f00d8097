"""Kernel tests run tiny ops: intra-op threads on the shared CPU cores only add contention (10x slower under load)."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
