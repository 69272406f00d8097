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
  sparse-attention layers dense), so a converted model needs no second copy in memory; otherwise a frozen teacher
  loaded from a path.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from ..conversion.linearize import linear_attention_layers, set_attention_transfer

__all__ = ["attention_transfer_loss", "gate_distillation_loss", "source_function", "DistillationTeacher",
           "distillation_loss", "training_regularizer"]


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


def gate_distillation_loss(model, inputs: dict) -> torch.Tensor:
    """Mean over seer layers of ``KL(pooled attention ‖ gate)`` on this batch."""
    from ..layers.sparse_attention import sparse_attention_layers
    from ..models.backbone import HfArchModel

    layers = [layer for layer in sparse_attention_layers(model) if layer.block_gate is not None]
    if not layers:
        raise ValueError("training.objective 'gate_distillation' needs a model with SeerAttention block gates "
                         f"({type(model).__name__} has none); convert it first (hf-arch convert --to "
                         "sparse_attention --method seer)")
    for layer in layers:
        layer.gate_distillation = True
    try:
        model(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"), use_cache=False)
        # The backbone's mean gate KL (taken from the decoder layers' outputs, so it survives checkpointing).
        backbone = next(m for m in model.modules() if isinstance(m, HfArchModel))
        loss = backbone.last_auxiliary_loss
    finally:
        for layer in layers:
            layer.gate_distillation = False
    return loss


@contextlib.contextmanager
def source_function(model):
    """Run ``model`` as the function it was converted from: linear layers return their softmax teachers, sparse
    attention layers attend densely. Yields whether the model has any such layer."""
    from ..layers.sparse_attention import sparse_attention_layers

    sparse = sparse_attention_layers(model)
    linear = set_attention_transfer(model, True)
    for layer in sparse:
        layer.force_dense = True
    try:
        yield bool(linear or sparse)
    finally:
        set_attention_transfer(model, False)  # also drops the per-layer losses the teacher pass left
        for layer in sparse:
            layer.force_dense = False


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
            with context, source_function(student):
                logits = student(**batch).logits
        finally:
            student.train(was_training)
        return logits


def training_regularizer(model, outputs):
    """The part of ``outputs.loss`` that is not next-token loss: the MoE auxiliary loss and the sparse-attention
    terms (seer gate self-distillation, flux Lagrangian); 0 when none applies."""
    total = 0.0
    aux = getattr(outputs, "aux_loss", None)
    if aux is not None:
        total = total + aux
    for module in model.modules():
        penalty = getattr(module, "last_auxiliary_loss", None)
        if isinstance(penalty, torch.Tensor):
            total = total + penalty
    return total


def distillation_loss(student_logits, teacher_logits, labels, temperature: float) -> torch.Tensor:
    """``T² · KL(teacher ‖ student)`` per real (label != -100) position, averaged; next-token aligned like the
    LM loss (position t predicts token t + 1)."""
    s = student_logits[:, :-1].float() / temperature
    t = teacher_logits[:, :-1].float() / temperature
    real = labels[:, 1:] != -100
    kl = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="none").sum(-1)
    return kl[real].mean() * temperature**2 if real.any() else kl.sum() * 0.0
