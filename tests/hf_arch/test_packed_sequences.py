"""Packed rows (one row holding several sequences back to back, position_ids restarting at 0, as transformers'
DataCollatorWithFlattening makes them) give each sequence the logits it gets alone, for every mixer kind: softmax
through a backend, linear layers, and the mixers that read positions themselves (SA-Softmax, Cubit's KRR, affine
value means, Seer's blocks, Flux's per-input route)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import hf_arch
from hf_arch.registry import example_layouts

TINY = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256)
LAYOUTS = {
    "gated_attention": ("gated_attention", {}),
    "gla_full_hybrid": ("gla", dict(linear_to_full_ratio=1)),
    "gated_deltanet": ("gated_deltanet", {}),
    "moe": ("moe", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)),
    "sa_softmax": ("sa_softmax", {}),
    "cubit": ("cubit", {}),
    "affine_attention": ("affine_attention", {}),
    "diff_attention": ("diff_attention", dict(diff_attn_noise_heads=2)),
    "sas": ("sas", {}),
    "sparse_seer": ("sparse_attention", dict(sparse_attn_method="seer", sparse_attn_block_size=4)),
    "sparse_flux": ("sparse_attention", dict(sparse_attn_method="flux", sparse_attn_block_size=4,
                                             sparse_attn_window_blocks=1)),
    **example_layouts(),  # every variant's own examples (registered with it)
}
LENGTHS = (13, 22)


@pytest.mark.parametrize("name", sorted(LAYOUTS))
@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@torch.no_grad()
def test_packed_row_equals_each_sequence_alone(name, attn_implementation):
    variant, extra = LAYOUTS[name]
    torch.manual_seed(0)
    config = hf_arch.get_variant(variant).config_class(**{**TINY, **extra})
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation).eval()
    generator = torch.Generator().manual_seed(5)
    sequences = [torch.randint(0, TINY["vocab_size"], (1, n), generator=generator) for n in LENGTHS]
    packed_ids = torch.cat(sequences, dim=1)
    positions = torch.cat([torch.arange(n) for n in LENGTHS])[None]
    packed = model(packed_ids, position_ids=positions, use_cache=False).logits
    start = 0
    for sequence in sequences:
        alone = model(sequence, use_cache=False).logits
        n = sequence.shape[1]
        torch.testing.assert_close(packed[:, start:start + n], alone, rtol=1e-4, atol=1e-4)
        start += n
