"""Training objectives beyond next-token loss, for recovering converted checkpoints.

- **Attention transfer** (stage 1 of LoLCATs / Lizard / Liger-style linearization): every linear-attention layer
  runs its softmax teacher (its own frozen source q/k/v/o weights) next to its linear output; the loss is the mean
  over layers of ``MSE(linear, softmax)`` and the residual stream carries the teacher's output, so each layer learns
  from exactly the inputs it will see. Because no student output propagates, the per-layer objectives are
  decoupled: training them jointly equals training them layer by layer (with a summed loss).
- **Distillation**: ``lm_weight · CE + kl_weight · T² · KL(teacher ‖ student)`` at temperature ``T`` over real
  tokens. Teacher ``"self"``: the model's own source function (adapters disabled, linear layers in teacher mode), so
  a linearized model needs no second copy in memory; otherwise a frozen teacher loaded from a path.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from ..conversion.linearize import linear_attention_layers, set_attention_transfer

__all__ = ["attention_transfer_loss", "DistillationTeacher", "distillation_loss"]


def attention_transfer_loss(model, inputs: dict) -> torch.Tensor:
    """Mean per-layer MSE between each linear layer's output and its softmax teacher on this batch."""
    from ..layers.linear_attention import attention_transfer_losses

    if not set_attention_transfer(model, True):
        raise ValueError("training.objective 'attention_transfer' needs a model with linear-attention layers "
                         f"({type(model).__name__} has none); convert it first (hf-arch convert --to gla ...)")
    try:
        model(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"), use_cache=False)
        losses = attention_transfer_losses(model)
    finally:
        set_attention_transfer(model, False)
    return torch.stack(losses).mean()


class DistillationTeacher:
    """Teacher logits on a batch: ``"self"`` (the model's own frozen source function) or a loaded checkpoint."""

    def __init__(self, teacher: str, student, temperature: float) -> None:
        self.temperature = temperature
        self.model = None
        if teacher == "self":
            if not linear_attention_layers(student):
                raise ValueError("distill.teacher 'self' reproduces the source through the linear layers' softmax "
                                 "teachers; this model has no linear-attention layers, give a teacher checkpoint path")
        else:
            from transformers import AutoModelForCausalLM

            self.model = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32).eval()
            self.model.requires_grad_(False)
            if self.model.config.vocab_size != student.config.vocab_size:
                raise ValueError(f"distill.teacher {teacher} has vocab_size {self.model.config.vocab_size}, the "
                                 f"student {student.config.vocab_size}: their logits cannot be compared")

    @torch.no_grad()
    def logits(self, student, inputs: dict) -> torch.Tensor:
        batch = {"input_ids": inputs["input_ids"], "attention_mask": inputs.get("attention_mask"), "use_cache": False}
        if self.model is not None:
            self.model.to(inputs["input_ids"].device)
            return self.model(**batch).logits
        disable = getattr(student, "disable_adapter", None)
        context = disable() if callable(disable) else contextlib.nullcontext()
        was_training = student.training
        student.eval()  # no dropout in the teacher pass
        set_attention_transfer(student, True)
        try:
            with context:
                logits = student(**batch).logits
        finally:
            set_attention_transfer(student, False)  # also drops the per-layer losses the teacher pass left
            student.train(was_training)
        return logits


def distillation_loss(student_logits, teacher_logits, labels, temperature: float) -> torch.Tensor:
    """``T² · KL(teacher ‖ student)`` per real (label != -100) position, averaged; next-token aligned like the
    LM loss (position t predicts token t + 1)."""
    s = student_logits[:, :-1].float() / temperature
    t = teacher_logits[:, :-1].float() / temperature
    real = labels[:, 1:] != -100
    kl = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="none").sum(-1)
    return kl[real].mean() * temperature**2 if real.any() else kl.sum() * 0.0
