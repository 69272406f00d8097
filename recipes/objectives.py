"""Training objectives beyond next-token loss, for recovering converted checkpoints.

- **Attention transfer** (stage 1 of LoLCATs / Lizard / Liger-style linearization): every linear-attention layer
  runs its softmax teacher (its own frozen source q/k/v/o weights) next to its linear output; the loss is the mean
  over layers of ``MSE(linear, softmax)`` and the residual stream carries the teacher's output, so each layer learns
  from exactly the inputs it will see. Because no student output propagates, the per-layer objectives are
  decoupled: training them jointly equals training them layer by layer (with a summed loss).
- **Gate distillation** (SeerAttention): every block gate is pulled (KL) toward its frozen layer's true attention
  map pooled to blocks, while the layers attend densely; only the gates train.
- **Distillation**: ``lm_weight · CE + kl_weight · T² · KL(teacher ‖ student)`` at temperature ``T`` over real
  tokens. Teacher ``"self"``: the model's own source function (adapters disabled, linear layers in teacher mode,
  sparse-attention layers dense: :data:`SOURCE_FUNCTION`), so a converted model needs no second copy in memory;
  otherwise a frozen teacher loaded from a path.

Modes are forward arguments and per-layer terms come back in the model output (``hf_arch.layers.auxiliary``): nothing
is switched on the modules, so an interrupted step leaves no layer in a training mode.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from ..conversion.linearize import linear_attention_layers

__all__ = ["SOURCE_FUNCTION", "attention_transfer_loss", "gate_distillation_loss", "DistillationTeacher",
           "distillation_loss", "training_regularizer"]

# Forward arguments that make a converted model compute the function it was converted from: linear layers return
# their softmax teachers, sparse-attention layers attend densely.
SOURCE_FUNCTION = {"attention_transfer": True, "sparse_attention_mode": "dense"}


def attention_transfer_loss(model, inputs: dict) -> torch.Tensor:
    """Mean per-layer MSE between each linear layer's output and its softmax teacher on this batch."""
    if not linear_attention_layers(model):
        raise ValueError("training.objective 'attention_transfer' needs a model with linear-attention layers "
                         f"({type(model).__name__} has none); convert it first (hf-arch convert --to gla ...)")
    outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"), use_cache=False,
                    attention_transfer=True)
    return torch.stack(outputs.transfer_losses).mean()


def gate_distillation_loss(model, inputs: dict) -> torch.Tensor:
    """Mean over seer layers of ``KL(pooled attention ‖ gate)`` on this batch."""
    from ..layers.sparse_attention import sparse_attention_layers

    if not any(layer.block_gate is not None for layer in sparse_attention_layers(model)):
        raise ValueError("training.objective 'gate_distillation' needs a model with SeerAttention block gates "
                         f"({type(model).__name__} has none); convert it first (hf-arch convert --to "
                         "sparse_attention --method seer)")
    # The gate KLs come back as outputs of the decoder layers, so they survive gradient checkpointing.
    outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"), use_cache=False,
                    sparse_attention_mode="gate_distillation")
    return torch.stack(outputs.gate_losses).mean()


class DistillationTeacher:
    """Teacher logits on a batch: ``"self"`` (the model's own frozen source function) or a loaded checkpoint."""

    def __init__(self, teacher: str, student, temperature: float) -> None:
        self.temperature = temperature
        self.model = None
        if teacher == "self":
            from ..layers.sparse_attention import sparse_attention_layers

            if not linear_attention_layers(student) and not sparse_attention_layers(student):
                raise ValueError("distill.teacher 'self' reproduces the source through the linear layers' softmax "
                                 "teachers or the sparse layers' dense attention; this model has neither, give a "
                                 "teacher checkpoint path")
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
        try:
            with context:
                logits = student(**batch, **SOURCE_FUNCTION).logits
        finally:
            student.train(was_training)
        return logits


def training_regularizer(outputs):
    """The part of ``outputs.loss`` that is not next-token loss: the MoE auxiliary loss (``aux_loss``), the
    sparse-attention terms (``sparse_attention_loss``: seer gate self-distillation, flux Lagrangian) and ACM's compute
    price (``compute_loss``); 0 when none applies."""
    total = 0.0
    for name in ("aux_loss", "sparse_attention_loss", "compute_loss"):
        term = getattr(outputs, name, None)
        if term is not None:
            total = total + term
    return total


def distillation_loss(student_logits, teacher_logits, labels, temperature: float) -> torch.Tensor:
    """``T² · KL(teacher ‖ student)`` per real (label != -100) position, averaged; next-token aligned like the
    LM loss (position t predicts token t + 1)."""
    s = student_logits[:, :-1].float() / temperature
    t = teacher_logits[:, :-1].float() / temperature
    real = labels[:, 1:] != -100
    kl = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="none").sum(-1)
    return kl[real].mean() * temperature**2 if real.any() else kl.sum() * 0.0
