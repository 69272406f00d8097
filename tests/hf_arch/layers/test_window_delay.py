"""delay_by_window: the linear inputs of a LoLCATs hybrid, shifted by the window, in one call or across cache calls."""

from __future__ import annotations

import torch
from transformers.cache_utils import LinearAttentionLayer

from hf_arch.layers.window_delay import PENDING_STATE_SLOT, delay_by_window


def _inputs(T: int):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(2, T, 3, 4, generator=g), torch.randn(2, T, 3, generator=g), None]


def test_one_call_shifts_by_the_window_with_zeros_in_front():
    keys, gates, missing = _inputs(7)
    delayed_keys, delayed_gates, still_missing = delay_by_window([keys, gates, missing], 3)
    assert still_missing is None
    assert torch.equal(delayed_keys[:, 3:], keys[:, :4]) and (delayed_keys[:, :3] == 0).all()
    assert torch.equal(delayed_gates[:, 3:], gates[:, :4]) and delayed_gates.dtype == gates.dtype


def test_cache_calls_reach_into_earlier_tokens():
    keys, gates, _ = _inputs(11)
    whole = delay_by_window([keys, gates], 4)
    layer = LinearAttentionLayer()
    pieces = [delay_by_window([keys[:, a:b], gates[:, a:b]], 4, cache_layer=layer)
              for a, b in ((0, 2), (2, 3), (3, 9), (9, 10), (10, 11))]  # shorter and longer than the window
    for index in range(2):
        torch.testing.assert_close(torch.cat([p[index] for p in pieces], 1), whole[index], rtol=0, atol=0)
    assert layer.number_of_states == PENDING_STATE_SLOT + 1
    assert layer.conv_states[PENDING_STATE_SLOT].shape == (2, 3 * 4 + 3, 4)  # the last window's inputs wait
    # Beam reordering moves the waiting inputs with the rest of the cache entry.
    layer.reorder_cache(torch.tensor([1, 0]))
    nxt = delay_by_window([keys[:, :1], gates[:, :1]], 4, cache_layer=layer)
    torch.testing.assert_close(nxt[0][0], keys[1:2, 7:8].view(1, 3, 4), rtol=0, atol=0)


def test_packed_sequences_never_receive_another_sequences_inputs():
    keys, gates, _ = _inputs(9)
    position = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3]])  # two packed sequences of 5 and 4 tokens
    delayed_keys, _ = delay_by_window([keys[:1], gates[:1]], 2, position_in_sequence=position)
    assert torch.equal(delayed_keys[0, 2:5], keys[0, 0:3]) and torch.equal(delayed_keys[0, 7:9], keys[0, 5:7])
    assert (delayed_keys[0, [0, 1, 5, 6]] == 0).all()
