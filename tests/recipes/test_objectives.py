"""recipes/objectives.py: what a distillation objective adds beside next-token and KL terms."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

import hf_arch
from hf_arch.recipes.objectives import training_regularizer

SHAPE = dict(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, pad_token_id=0, eos_token_id=1, bos_token_id=2)


def test_the_regularizer_is_the_loss_beyond_next_token_prediction():
    """Distillation recomputes the next-token term from logits, so whatever else the model's loss holds (here ACM's
    compute price) must come back through the regularizer, or a distilled ACM would train with no price."""
    torch.manual_seed(0)
    config = hf_arch.HybridConfig(**SHAPE, channel_mixer_types=["acm", "acm"],
                                  mixer_options={"acm": {"learners": 4, "compute_loss_weight": 0.3}})
    model = AutoModelForCausalLM.from_config(config).train()
    rows = torch.randint(3, 61, (2, 12), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(2)
    out = model(rows, labels=rows)
    next_token = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, 61), rows[:, 1:].reshape(-1))
    regularizer = training_regularizer(out)
    assert float(regularizer) > 0
    torch.testing.assert_close(out.loss, next_token + regularizer)
    assert training_regularizer(model.eval()(rows)) == 0.0
