"""The short causal convolution: its one-call conv1d path against the tap-by-tap path and a direct definition."""

from __future__ import annotations

import pytest
import torch

from hf_arch.layers.short_conv import ShortConvolution


def _conv(channels=6, K=4, seed=0):
    torch.manual_seed(seed)
    conv = ShortConvolution(channels, K)
    conv.init_parameters(torch.nn.init)
    return conv


def _definition(conv, x, past):
    """out_t = silu(sum_l w[:, K-1-l] * x_{t-l}), x before the input taken from ``past`` (zeros without)."""
    K = conv.kernel_size
    B, T, C = x.shape
    history = past[..., -(K - 1):].transpose(1, 2) if past is not None else x.new_zeros(B, K - 1, C)
    full = torch.cat([history, x], dim=1)
    out = torch.stack([sum(conv.weight[:, K - 1 - l] * full[:, K - 1 + t - l] for l in range(K)) for t in range(T)], 1)
    return torch.nn.functional.silu(out)


@pytest.mark.parametrize("T", [1, 2, 9])
@pytest.mark.parametrize("with_past", [False, True])
def test_conv1d_path_matches_definition_and_tap_path(T, with_past):
    conv = _conv()
    x = torch.randn(2, T, 6)
    past = torch.randn(2, 6, 5) if with_past else None  # longer than K-1: only the last K-1 inputs count
    fast = conv(x, past)
    torch.testing.assert_close(fast, _definition(conv, x, past))
    if not with_past:  # positions 0..T-1 of one sequence: the tap path reads zeros before it, as the conv1d path does
        torch.testing.assert_close(fast, conv(x, None, torch.arange(T)[None]))


def test_gradients_flow_to_weight_and_input():
    conv = _conv()
    x = torch.randn(1, 7, 6, requires_grad=True)
    conv(x).sum().backward()
    assert x.grad is not None and conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0
