"""STILL's intra-layer hybrid attention, written out quadratically: the reference the chunked path and the cached
decode are checked against (issue 20 item 3; "STILL: Selecting Tokens for Intra-Layer Hybrid Attention to Linearize
LLMs").

A query at position ``i`` sees three kinds of keys:

- the last ``window`` tokens (``i - window < j <= i``): softmax;
- older tokens its layer *selected* as salient: softmax too (sparse attention over a small set);
- every other older token: through the linear state (feature-mapped keys, GLA-style per-channel decay).

**Self-saliency.** Token ``j``'s score is the log-probability it gives itself in its own sliding-window softmax row,
``q_j·k_j·scale − logsumexp_{j−window < l <= j} q_j·k_l·scale`` (averaged over the query heads that share a key
head): computed at sliding-window cost, and high for tokens whose key stands out from their neighbourhood.
**Selection, delayed.** Positions are cut into blocks of ``block`` tokens; once a block is complete, its ``topk``
most salient tokens per key head are selected. A token leaves the window ``window`` positions after it arrived; with
``block <= window`` its block is complete by then, so training (whole sequence) and decoding (token by token) select
the same tokens. Tokens of a block still being filled are all inside the window.
**One normalisation** (LoLCATs' shared denominator): softmax keys weigh ``γ · exp(s − m)`` (``m`` the row's maximum
over its softmax keys), linear keys ``w · φ(q)·(decay ⊙ φ(k))``; ``o = Σ weight · v / Σ weight``. The linear part is
LoLCATs' delayed recurrence: key ``j`` decays by the gates of tokens ``j+1 … i−window``.

With ``topk = 0`` this is LoLCATs' hybrid; with ``topk = block`` every old token is selected and it is softmax
attention (times γ, cancelled by the normalisation).
"""

from __future__ import annotations

import torch

__all__ = ["self_saliency", "select_salient", "naive_still_attention"]


def _scores(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """``[B, T, H, D]`` x ``[B, T, H_kv, D]`` -> ``[B, H, T, T]`` (key heads repeated over their query heads)."""
    groups = q.shape[2] // k.shape[2]
    k = k.repeat_interleave(groups, dim=2)
    return torch.einsum("bihd,bjhd->bhij", q, k) * scale


def self_saliency(q: torch.Tensor, k: torch.Tensor, window: int, scale: float) -> torch.Tensor:
    """``[B, T, H_kv]``: each token's log-probability of itself in its own sliding-window row, averaged over the
    query heads of each key head."""
    B, T, H, _ = q.shape
    H_kv = k.shape[2]
    scores = _scores(q, k, scale)  # [B, H, T, T]
    i = torch.arange(T, device=q.device)
    in_window = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - window)
    row = scores.masked_fill(~in_window, float("-inf")).logsumexp(-1)  # [B, H, T]
    own = scores.diagonal(dim1=-2, dim2=-1)  # [B, H, T]
    return (own - row).view(B, H_kv, H // H_kv, T).mean(2).transpose(1, 2)


def select_salient(saliency: torch.Tensor, block: int, topk: int, row_start: torch.Tensor | None = None) -> torch.Tensor:
    """``saliency [B, T, H_kv]`` -> bool ``[B, T, H_kv]``: the ``topk`` most salient tokens of every complete block
    of ``block`` positions (ties: the earlier token); nothing in an incomplete last block. ``row_start [B]``: each
    row's first real position (left padding): its blocks start there, as they would for the row alone."""
    if row_start is not None and bool((row_start > 0).any()):
        selected = torch.zeros_like(saliency, dtype=torch.bool)
        for start in torch.unique(row_start).tolist():
            rows = torch.nonzero(row_start == start).flatten()
            selected[rows, start:] = select_salient(saliency[rows, start:], block, topk)
        return selected
    B, T, H_kv = saliency.shape
    selected = torch.zeros_like(saliency, dtype=torch.bool)
    complete = (T // block) * block
    if topk <= 0 or complete == 0:
        return selected
    blocks = saliency[:, :complete].reshape(B, complete // block, block, H_kv)
    order = torch.argsort(-blocks, dim=2, stable=True)[:, :, :topk]  # [B, nb, topk, H_kv]
    chosen = torch.zeros_like(blocks, dtype=torch.bool).scatter_(2, order, True)
    selected[:, :complete] = chosen.reshape(B, complete, H_kv)
    return selected


def naive_still_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    fq: torch.Tensor,
    fk: torch.Tensor,
    log_decay: torch.Tensor | None,
    *,
    window: int,
    block: int,
    topk: int,
    scale: float,
    linear_weight: float,
    softmax_weight: torch.Tensor | float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q ``[B, T, H, D]``, k / v ``[B, T, H_kv, D]`` (the softmax branch's, rotated); fq ``[B, T, H, F]``, fk
    ``[B, T, H_kv, F]`` (the linear branch's feature-mapped q / k); log_decay ``[B, T, H, F]`` (<= 0) or None (no
    decay); ``softmax_weight`` γ per head ``[H]`` or a number. Returns ``(o [B, T, H, D], selected [B, T, H_kv])``."""
    if block > window:
        raise ValueError(f"STILL: the selection block ({block}) must not exceed the window ({window}): a token must "
                         "leave the window only after its block's selection is known")
    B, T, H, D = q.shape
    groups = H // k.shape[2]
    wide = torch.promote_types(q.dtype, torch.float32)
    q, k, v, fq, fk = (x.to(wide) for x in (q, k, v, fq, fk))
    selected = select_salient(self_saliency(q, k, window, scale), block, topk)  # [B, T, H_kv]

    i = torch.arange(T, device=q.device)
    causal = i[None, :] <= i[:, None]
    in_window = causal & (i[None, :] > i[:, None] - window)
    old = i[None, :] <= i[:, None] - window  # [T (query), T (key)]
    chosen = selected.repeat_interleave(groups, dim=2).permute(0, 2, 1)[:, :, None, :]  # [B, H, 1, T (key)]
    softmax_keys = in_window[None, None] | (old[None, None] & chosen)  # [B, H, T, T]
    linear_keys = old[None, None] & ~chosen

    scores = _scores(q, k, scale).masked_fill(~softmax_keys, float("-inf"))
    peak = scores.amax(-1, keepdim=True)
    gamma = torch.as_tensor(softmax_weight, dtype=wide, device=q.device).reshape(-1)
    gamma = gamma.view(1, -1, 1, 1) if gamma.numel() > 1 else gamma.view(1, 1, 1, 1)
    soft = gamma * torch.exp(scores - peak)

    # Linear weights: w · φ(q_i) · (Π_{s=j+1}^{i−window} exp(g_s) ⊙ φ(k_j)) for the unselected old keys.
    fk_h = fk.repeat_interleave(groups, dim=2)
    if log_decay is None:
        linear = torch.einsum("bihf,bjhf->bhij", fq, fk_h)
    else:
        cum = log_decay.to(wide).cumsum(1)  # [B, T, H, F]: Σ_{s<=t} g_s
        until = cum[:, (i - window).clamp(min=0)]  # Σ_{s <= i−window} g_s, per query i
        # exp(cum_{i−w} − cum_j) per channel, only where the key is old (j <= i − w)
        decay = torch.exp((until[:, :, None] - cum[:, None, :]).clamp(max=0))  # [B, T (i), T (j), H, F]
        linear = torch.einsum("bihf,bijhf,bjhf->bhij", fq, decay, fk_h)
    linear = linear_weight * linear * linear_keys

    weights = soft + linear
    v_h = v.repeat_interleave(groups, dim=2).transpose(1, 2)  # [B, H, T, D]
    out = (weights @ v_h) / weights.sum(-1, keepdim=True)
    return out.transpose(1, 2).to(q.dtype), selected
