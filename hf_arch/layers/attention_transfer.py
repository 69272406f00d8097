"""Attention transfer (stage 1 of LoLCATs-style recovery), shared by every linear token mixer that keeps the softmax
layer's ``q/k/v/o_proj``: the layer's softmax teacher (the exact causal attention of its own projections, i.e. the
source layer's function) and the MSE of the layer's own output to it. A mixer called with
``attention_transfer=True`` returns the teacher's output, with the MSE as its auxiliary ``transfer_loss``
(``layers.auxiliary``), so each layer learns on the teacher's residual stream."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .attention import repeat_kv
from .rope import apply_rotary_pos_emb

__all__ = ["softmax_teacher", "transfer_loss"]


def softmax_teacher(mixer, x: torch.Tensor, position_embeddings, key_mask: torch.Tensor | None,
                    cu_seqlens: torch.LongTensor | None) -> torch.Tensor:
    """Exact causal softmax attention of ``mixer``'s ``q/k/v/o_proj`` (and ``q_norm`` / ``k_norm`` where it has
    them) with RoPE, on ``x [B, T, hidden]``; ``key_mask [B, ≥T]`` marks real tokens, ``cu_seqlens`` packed rows."""
    B, T, _ = x.shape
    H, H_kv, D = mixer.num_heads, mixer.num_key_value_heads, mixer.head_dim
    q = mixer.q_proj(x).view(B, T, H, D)
    k = mixer.k_proj(x).view(B, T, H_kv, D)
    v = mixer.v_proj(x).view(B, T, H_kv, D).transpose(1, 2)
    if getattr(mixer, "q_norm", None) is not None:
        q, k = mixer.q_norm(q), mixer.k_norm(k)
    if position_embeddings is None:
        raise ValueError(f"{type(mixer).__name__}: attention transfer needs position_embeddings (the source layer's "
                         "RoPE) for its softmax teacher")
    q, k = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), *position_embeddings)
    k, v = repeat_kv(k, H // H_kv), repeat_kv(v, H // H_kv)
    mask = None
    if key_mask is not None or cu_seqlens is not None:
        idx = torch.arange(T, device=x.device)
        allowed = (idx[None, :] <= idx[:, None])[None, None]  # [1, 1, T, T] causal
        if cu_seqlens is not None:  # packed rows: attend within one's own sequence
            seq = torch.bucketize(idx, cu_seqlens.to(x.device)[1:-1], right=True)
            allowed = allowed & (seq[None, :] == seq[:, None])[None, None]
        if key_mask is not None:
            allowed = allowed & key_mask[:, -T:].to(torch.bool)[:, None, None, :]
        # A padded query with nothing to attend to would give NaN; let it see itself (its output is unused).
        mask = allowed | torch.eye(T, dtype=torch.bool, device=x.device)[None, None]
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                       scale=getattr(mixer, "scaling", D**-0.5))
    return mixer.o_proj(o.transpose(1, 2).reshape(B, T, H * D))


def transfer_loss(output: torch.Tensor, teacher: torch.Tensor, token: torch.Tensor | None) -> torch.Tensor:
    """fp32 ``MSE(output, teacher.detach())`` over real tokens (``token [B, T]`` bool, None: all) and channels."""
    err = (output.float() - teacher.detach().float()).pow(2)
    if token is None:
        return err.mean()
    err = err * token[..., None].to(err.dtype)
    return err.sum() / (token.sum().clamp(min=1) * err.shape[-1]).to(err.dtype)
