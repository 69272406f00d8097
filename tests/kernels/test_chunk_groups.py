"""Chunk groups (kernels/chunk_groups.py): splitting a sequence's chunks into cache-sized groups that carry the
state from one to the next gives the one-pass result, outputs, final states and gradients alike."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hf_arch.kernels import chunk_groups
from hf_arch.kernels.delta_rule import chunk_gated_delta_rule
from hf_arch.kernels.gla import chunk_gla
from hf_arch.kernels.kda import chunk_kda


def _inputs(kind, T=100, H=2, D=16):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, T, H, D, generator=gen, dtype=torch.float64)
    k = F.normalize(torch.randn(2, T, H, D, generator=gen, dtype=torch.float64), dim=-1)
    v = torch.randn(2, T, H, D, generator=gen, dtype=torch.float64)
    h0 = torch.randn(2, H, D, D, generator=gen, dtype=torch.float64)
    if kind == "gdn":
        g = -torch.rand(2, T, H, generator=gen, dtype=torch.float64)
    else:
        g = -torch.rand(2, T, H, D, generator=gen, dtype=torch.float64)
    beta = torch.rand(2, T, H, generator=gen, dtype=torch.float64)
    return [q, k, v, g, beta, h0]


def _run(kind, tensors):
    q, k, v, g, beta, h0 = tensors
    if kind == "gdn":
        return chunk_gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True, chunk_size=16)
    if kind == "kda":
        return chunk_kda(q, k, v, g, beta, initial_state=h0, output_final_state=True, chunk_size=16)
    return chunk_gla(q, k, v, g, initial_state=h0, output_final_state=True, chunk_size=16)


@pytest.mark.parametrize("kind", ["gdn", "gla", "kda"])
@pytest.mark.parametrize("group_bytes", [1, 3 * 16 * 16 * 2 * 2 * 8])  # one chunk per group; three (last one short)
def test_groups_equal_one_pass(kind, group_bytes, monkeypatch):
    def outputs_and_grads():
        tensors = [t.clone().requires_grad_() for t in _inputs(kind)]
        o, state = _run(kind, tensors)
        (o.square().sum() + state.sum()).backward()
        return [o.detach(), state.detach()] + [t.grad for t in tensors if t.grad is not None]

    one_pass = outputs_and_grads()  # the default budget holds all 7 chunks of this small input in one group
    monkeypatch.setattr(chunk_groups, "GROUP_BYTES", group_bytes)
    grouped = outputs_and_grads()
    assert len(grouped) == len(one_pass)
    for a, b in zip(grouped, one_pass):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_group_size():
    cpu, meta = torch.device("cpu"), torch.device("meta")
    assert chunk_groups.chunk_group_size(10, chunk_groups.GROUP_BYTES // 3, cpu) == 3
    assert chunk_groups.chunk_group_size(10, chunk_groups.GROUP_BYTES * 4, cpu) == 1  # never empty
    assert chunk_groups.chunk_group_size(2, 1, cpu) == 2  # never more than there are
    assert chunk_groups.chunk_group_size(10, chunk_groups.GROUP_BYTES, meta) == 10  # off CPU: one pass
