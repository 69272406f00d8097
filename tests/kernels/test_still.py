"""STILL's reference attention (kernels/still/naive.py): equal to the definition written as loops, to softmax
attention when every old token is selected or none is old, to LoLCATs' hybrid with nothing selected; selection by
blocks, delayed, ties to the earlier token; bad settings refused by name."""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

from hf_arch.kernels.still import naive_still_attention, select_salient, self_saliency

B, T, H, H_KV, D, FEAT = 2, 13, 4, 2, 8, 6


def inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    return dict(q=randn(B, T, H, D), k=randn(B, T, H_KV, D), v=randn(B, T, H_KV, D),
                fq=randn(B, T, H, FEAT).abs(), fk=randn(B, T, H_KV, FEAT).abs(),
                log_decay=F.logsigmoid(randn(B, T, H, FEAT)) / 4)


def loop_reference(x, window, block, topk, scale, w, gamma):
    """The definition token by token: saliency, block selection, then each query's weights over its keys."""
    q, k, v, fq, fk, g = x["q"], x["k"], x["v"], x["fq"], x["fk"], x["log_decay"]
    groups = H // H_KV
    out = torch.zeros(B, T, H, D, dtype=torch.float64)
    for b in range(B):
        saliency = torch.zeros(T, H_KV, dtype=torch.float64)
        for j in range(T):
            for h in range(H):
                row = [q[b, j, h] @ k[b, l, h // groups] * scale for l in range(max(0, j - window + 1), j + 1)]
                saliency[j, h // groups] += (q[b, j, h] @ k[b, j, h // groups] * scale - torch.stack(row).logsumexp(0)) / groups
        selected = torch.zeros(T, H_KV, dtype=torch.bool)
        for start in range(0, T - block + 1, block):
            for kv in range(H_KV):
                scores = saliency[start:start + block, kv].tolist()
                order = sorted(range(block), key=lambda n: (-scores[n], n))[:topk]
                for n in order:
                    selected[start + n, kv] = True
        for i in range(T):
            for h in range(H):
                kv = h // groups
                soft = [j for j in range(i + 1) if j > i - window or selected[j, kv]]
                lin = [j for j in range(i + 1) if j <= i - window and not selected[j, kv]]
                s = torch.stack([q[b, i, h] @ k[b, j, kv] * scale for j in soft])
                weights = list(gamma * torch.exp(s - s.max()))
                for j in lin:
                    decay = torch.exp(g[b, j + 1:i - window + 1, h].sum(0)) if i - window >= j + 1 else torch.ones(FEAT, dtype=torch.float64)
                    weights.append(w * (fq[b, i, h] @ (decay * fk[b, j, kv])))
                keys = soft + lin
                weights = torch.stack(weights)
                out[b, i, h] = (weights[:, None] * v[b, keys, kv]).sum(0) / weights.sum()
    return out


@pytest.mark.parametrize("window, block, topk", [(4, 3, 1), (5, 4, 2), (3, 3, 0), (4, 2, 2)])
def test_equals_the_definition_written_as_loops(window, block, topk):
    x = inputs()
    scale = D ** -0.5
    out, _ = naive_still_attention(**x, window=window, block=block, topk=topk, scale=scale, linear_weight=0.7,
                                   softmax_weight=0.3)
    torch.testing.assert_close(out, loop_reference(x, window, block, topk, scale, 0.7, 0.3))


def test_softmax_attention_when_every_old_token_is_selected_or_none_is_old():
    x = inputs(1)
    k_h, v_h = (x[n].repeat_interleave(H // H_KV, dim=2).transpose(1, 2) for n in ("k", "v"))
    dense = F.scaled_dot_product_attention(x["q"].transpose(1, 2), k_h, v_h, is_causal=True).transpose(1, 2)
    everything, _ = naive_still_attention(**x, window=4, block=3, topk=3, scale=D ** -0.5, linear_weight=1.0,
                                          softmax_weight=0.2)
    # the last incomplete block (tokens 12) is still in every query's window, so all old keys are softmax keys
    torch.testing.assert_close(everything, dense)
    short = {n: t[:, :4] for n, t in x.items()}
    inside, _ = naive_still_attention(**short, window=4, block=2, topk=0, scale=D ** -0.5, linear_weight=1.0,
                                      softmax_weight=0.5)
    torch.testing.assert_close(inside, dense[:, :4])


def test_nothing_selected_is_lolcats_hybrid():
    """topk 0: softmax over the window, the delayed GLA recurrence over older keys, one denominator."""
    x = inputs(2)
    window, scale, w, gamma = 4, D ** -0.5, 0.9, 0.25
    out, selected = naive_still_attention(**x, window=window, block=2, topk=0, scale=scale, linear_weight=w,
                                          softmax_weight=gamma)
    assert not selected.any()
    groups = H // H_KV
    q, k, v = x["q"], x["k"].repeat_interleave(groups, 2), x["v"].repeat_interleave(groups, 2)
    fq, fk, g = x["fq"], x["fk"].repeat_interleave(groups, 2), x["log_decay"]
    state = torch.zeros(B, H, FEAT, D, dtype=torch.float64)
    norm = torch.zeros(B, H, FEAT, dtype=torch.float64)
    for i in range(T):
        j = i - window  # the key that enters the delayed state now, decayed by the delayed gate
        if j >= 0:
            state = torch.exp(g[:, j])[..., None] * state + fk[:, j][..., None] * v[:, j][:, :, None]
            norm = torch.exp(g[:, j]) * norm + fk[:, j]
        lo = max(0, i - window + 1)
        s = torch.einsum("bhd,bjhd->bhj", q[:, i], k[:, lo:i + 1]) * scale
        p = gamma * torch.exp(s - s.amax(-1, keepdim=True))
        numerator = torch.einsum("bhj,bjhd->bhd", p, v[:, lo:i + 1]) + w * torch.einsum("bhf,bhfd->bhd", fq[:, i], state)
        denominator = p.sum(-1) + w * torch.einsum("bhf,bhf->bh", fq[:, i], norm)
        torch.testing.assert_close(out[:, i], numerator / denominator[..., None])


def test_self_saliency_and_block_selection():
    x = inputs(3)
    saliency = self_saliency(x["q"], x["k"], window=3, scale=0.5)
    assert saliency.shape == (B, T, H_KV) and (saliency <= 1e-12).all()  # log-probabilities
    # the first token has only itself in its window: probability 1
    torch.testing.assert_close(saliency[:, 0], torch.zeros(B, H_KV, dtype=torch.float64))
    scores = torch.tensor([[0.0, 3.0, 1.0, 3.0, 2.0, 9.0, 9.0]]).view(1, 7, 1)
    chosen = select_salient(scores, block=3, topk=1)[0, :, 0].tolist()
    assert chosen == [False, True, False, False, False, True, False]  # block 2 (index 6) is incomplete
    ties = select_salient(torch.zeros(1, 4, 1), block=4, topk=2)[0, :, 0].tolist()
    assert ties == [True, True, False, False]  # equal scores: the earlier tokens
    assert not select_salient(scores, block=3, topk=0).any()


def test_a_block_larger_than_the_window_is_refused():
    x = inputs()
    with pytest.raises(ValueError, match="selection block \\(5\\) must not exceed the window \\(4\\)"):
        naive_still_attention(**x, window=4, block=5, topk=1, scale=1.0, linear_weight=1.0, softmax_weight=1.0)
