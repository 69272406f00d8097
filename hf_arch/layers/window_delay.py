"""Linear-branch inputs delayed by a window: the linear part of a LoLCATs hybrid sees only tokens the window has left.

In LoLCATs' hybrid a query at position ``t`` attends keys ``t - W < s <= t`` with softmax and every older key
``s <= t - W`` through the linear state. Delaying the linear branch's per-token inputs (feature-mapped keys, values,
decays, write strengths) by ``W`` positions turns that into an ordinary causal recurrence, so the existing chunked,
recurrent and varlen kernels compute it unchanged.

Under a cache the last ``W`` tokens' inputs are waiting to enter the state: they live in a second conv-state slot of
the layer's transformers cache entry (a ``W``-wide "conv window"), so beam reordering, batch expansion, reset and
rollback move them with the rest of the state.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["PENDING_STATE_SLOT", "delay_by_window"]

# The conv-state slot holding the pending inputs (slot 0 is the short convolution's).
PENDING_STATE_SLOT = 1


def _ensure_state_slot(layer, slot: int) -> None:
    """Give a transformers linear-attention cache layer a ``slot``-th (conv, recurrent) state pair if it has none."""
    if slot < layer.number_of_states:
        return
    for index in range(layer.number_of_states, slot + 1):
        layer.conv_states[index] = None
        layer.recurrent_states[index] = None
        layer.is_conv_states_initialized[index] = False
        layer.is_recurrent_states_initialized[index] = False
        layer.has_previous_state[index] = False
        layer.conv_kernel_size[index] = None
        if hasattr(layer, "recurrent_states_history"):
            layer.recurrent_states_history[index] = []
    layer.number_of_states = slot + 1


def delay_by_window(
    tensors: list[torch.Tensor | None],
    window: int,
    cache_layer=None,
    position_in_sequence: torch.Tensor | None = None,
) -> list[torch.Tensor | None]:
    """Each ``[B, T, ...]`` tensor shifted ``window`` positions later in time, zeros where nothing is that old.

    ``cache_layer``: the layer's transformers linear-attention cache entry; the shift then reaches into the tokens
    of earlier calls (and keeps this call's last ``window`` for the next). ``position_in_sequence`` ``[B | 1, T]``:
    packed sequences (no cache): a token never receives another sequence's inputs. None entries pass through.
    """
    present = [t for t in tensors if t is not None]
    B, T = present[0].shape[:2]
    wide = torch.float32
    for t in present:
        wide = torch.promote_types(wide, t.dtype)
    widths = [t[0, 0].numel() for t in present]
    packed = torch.cat([t.reshape(B, T, -1).to(wide) for t in present], dim=-1)  # [B, T, C]

    if cache_layer is not None:
        _ensure_state_slot(cache_layer, PENDING_STATE_SLOT)
        # [pending | new] along time; a first call gets the new inputs alone (or zero-padded to the window).
        full = cache_layer.update_conv_state(packed.transpose(1, 2), PENDING_STATE_SLOT, conv_kernel_size=window)
        full = full.transpose(1, 2)
        full = F.pad(full, (0, 0, max(0, window + T - full.shape[1]), 0))[:, -(window + T):]
        delayed = full[:, :T]
    elif position_in_sequence is not None:
        source = (torch.arange(T, device=packed.device) - window).clamp(min=0)
        delayed = packed[:, source] * (position_in_sequence >= window).unsqueeze(-1).to(packed.dtype)
    else:
        delayed = F.pad(packed, (0, 0, window, 0))[:, :T]

    pieces = iter(delayed.split(widths, dim=-1))
    return [None if t is None else next(pieces).reshape(t.shape).to(t.dtype) for t in tensors]
