"""The default score: softmax through transformers' attention backend (eager / sdpa / flex / flash)."""

from __future__ import annotations

from .attention_registry import AttentionScore, register_attention_score


@register_attention_score("softmax")
class BackendSoftmaxScore(AttentionScore):
    def attend(self, layer, hidden_states, query, key, value, *, attention_mask=None, position_embeddings=None,
               past_key_values=None, padding_mask=None, output_attentions=False, **kwargs):
        values_seen = value
        if past_key_values is not None:  # values_seen: what this step attends (a sliding cache returns its window)
            filled = layer.filled_length(past_key_values, key.shape[2], padding_mask)
            key, value = past_key_values.update(key, value, self.layer_idx)
            values_seen = value[:, :, :filled] if filled is not None else value  # the backend masks empty slots
        attn_output, weights = layer.attend(query, key, value, attention_mask, **kwargs)
        return attn_output, values_seen, weights
