"""Causal pairwise products under per-channel decay, ``P[i, j] = sum_d x_id k_jd exp(b_id - b_jd)`` (j <= i), for
the chunked CPU paths of the gated linear recurrences (GLA, KDA) whose decay differs per key channel.

A ``[C, C, K]`` tensor of pairwise decays per chunk is the obvious form and the slow one (K exponentials per pair).
Here a block of 2s tokens is ``[[P_left, 0], [Q, P_right]]`` and the off-diagonal quadrant factorises exactly through
the boundary r between the halves, ``exp(b_i - b_j) = exp(b_i - r) * exp(r - b_j)``, both factors <= 1: one matmul
per block and level, O(C K log C) elementwise work, no data-dependent branch. Every exponent is a sum of g over the
tokens it spans (never the difference of two long cumsums), so a gate spike costs no precision elsewhere and
nothing overflows however strong the gates are.
"""

from __future__ import annotations

import torch

__all__ = ["decayed_pairs", "prefix_sum", "suffix_sum"]

# Prefix and suffix sums along the time axis are matmuls with a 0/1 triangular matrix: each output still sums only
# the terms it spans (no difference of two long sums), and one GEMM beats cumsum (plus two flips for the suffix) on
# CPU for the short spans used here (at most a chunk).


def _triangle(n: int, x: torch.Tensor, diagonal: int, upper: bool) -> torch.Tensor:
    ones = torch.ones(n, n, dtype=x.dtype, device=x.device)
    return ones.triu(diagonal) if upper else ones.tril(diagonal)


def prefix_sum(x):
    """``sum_{l <= j} x_l`` along dim -2 (inclusive)."""
    return _triangle(x.shape[-2], x, 0, upper=False) @ x


def suffix_sum(x):
    """``sum_{l > j} x_l`` along dim -2 (exclusive suffix sum: a sum of same-sign terms, no cancellation)."""
    return _triangle(x.shape[-2], x, 1, upper=True) @ x


def decayed_pairs(xs, k, g):
    """For each x of ``xs``: ``P[i, j] = sum_d x_id k_jd exp(b_id - b_jd)`` for j <= i, 0 above the diagonal, with
    ``b = cumsum(g)`` the cumulative log decay (g <= 0).

    xs: tensors ``[*, C, K]``; k, g: ``[*, C, K]`` with C a power of two. Returns ``[len(xs), *, C, C]``. Built
    bottom-up by halving: at level s every block of 2s tokens is ``[[P_left, 0], [Q, P_right]]`` with the
    off-diagonal quadrant factorised through ``r = b`` at the end of the left half::

        Q = (x_right * exp(b_right - r)) @ (k_left * exp(r - b_left))^T

    Both exponents are <= 0 and are sums of g inside the block (no difference of long cumsums), one matmul per block,
    and no ``[C, C, K]`` tensor: elementwise work and memory are ``O(C K log C)`` per chunk.
    """
    *lead, C, K = k.shape
    X = torch.stack(xs)  # [m, *, C, K]
    m = X.shape[0]
    P = (X * k).sum(-1).reshape(m, *lead, C, 1, 1)  # the diagonal: exp(0) = 1
    s = 1
    while s < C:
        nb = C // (2 * s)
        Xv = X.reshape(m, *lead, nb, 2, s, K)
        kv, gv = k.reshape(*lead, nb, 2, s, K), g.reshape(*lead, nb, 2, s, K)
        if s == 1:  # one token a side: exp(b_i - r) = exp(g_i), exp(r - b_j) = 1
            x_right, k_left = Xv[..., 1, :, :] * gv[..., 1, :, :].exp(), kv[..., 0, :, :]
        else:
            x_right = Xv[..., 1, :, :] * prefix_sum(gv[..., 1, :, :]).exp()  # exp(b_i - r), i in the right half
            k_left = kv[..., 0, :, :] * suffix_sum(gv[..., 0, :, :]).exp()  # exp(r - b_j), j in the left half
        Q = x_right @ k_left.transpose(-1, -2)  # [m, *, nb, s, s]
        Pv = P.reshape(m, *lead, nb, 2, s, s)
        left, right = Pv[..., 0, :, :], Pv[..., 1, :, :]
        P = torch.cat([torch.cat([left, torch.zeros_like(left)], -1), torch.cat([Q, right], -1)], -2)
        s *= 2
    return P.reshape(m, *lead, C, C)
