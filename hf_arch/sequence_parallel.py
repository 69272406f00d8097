"""Train long sequences across processes: LASP-2 sequence parallelism for our models (issue 20; arXiv 2502.07563).

Each rank of a process group holds one contiguous chunk of every sequence. The recurrent ops exchange one state per
layer (:mod:`hf_arch.kernels.lasp2`), softmax layers all-gather keys and values (LASP-2H,
:mod:`hf_arch.layers.sequence_parallel_attention`), short convolutions take the previous chunk's last inputs; every
token-wise part (embeddings, MLPs, norms, the LM head) runs on the chunk as it is. The loss of a chunk is its tokens'
summed NLL over the whole batch's token count, so the ranks' losses add up to the batch's mean loss, and the
gradients flowing between ranks make every rank's parameter gradients its share of the single-process ones.

    batch = split_batch(batch, rank, world)            # this rank's chunk, global positions, shifted labels
    with sequence_parallel(group, total_length=batch["total_length"]):
        loss = sequence_parallel_loss(model, batch)    # Σ over ranks = the whole batch's loss
    loss.backward()                                     # then all-reduce (sum) the parameter gradients over group

In training, ``SequenceParallelTrainer`` (or ``--sequence_parallel_size`` in ``hf-arch train``) does all of it on top
of transformers' Trainer and accelerate's process group (``accelerate launch`` / ``torchrun``).
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from transformers import Trainer

from .kernels.lasp2 import active_plan, chunk_bounds, sequence_parallel

__all__ = ["split_batch", "sequence_parallel_loss", "sequence_parallel", "all_reduce_gradients", "IGNORE_INDEX",
           "SequenceParallelMixin", "SequenceParallelTrainer", "check_sequence_parallel_support"]

IGNORE_INDEX = -100


def split_batch(batch: dict, rank: int, world_size: int, pad_token_id: int = 0) -> dict:
    """This rank's chunk of a causal-LM batch ``{"input_ids" [B, T], "labels" [B, T] (optional, else the inputs),
    "attention_mask" (optional, all ones)}``: ``input_ids``, global ``position_ids``, ``shift_labels`` (each token's
    next token, shifted *before* splitting so chunk boundaries lose none), ``num_items`` (the batch's label count)
    and ``total_length``. ``T`` is padded on the right to a multiple of ``world_size`` (padding is never a label and
    comes after every real token, so causal outputs of the real tokens are unchanged)."""
    input_ids = batch["input_ids"]
    if input_ids.dim() != 2:
        raise ValueError(f"split_batch: input_ids must be [batch, tokens], got shape {tuple(input_ids.shape)}")
    mask = batch.get("attention_mask")
    if mask is not None and not bool(mask.all()):
        raise ValueError("split_batch: sequence parallelism takes unpadded rows (attention_mask has zeros); pack or "
                         "pad the text with real tokens instead")
    labels = batch.get("labels")
    labels = input_ids if labels is None else labels
    B, T = input_ids.shape
    if world_size > T:
        raise ValueError(f"split_batch: {T} tokens cannot be split across {world_size} ranks (a world size larger "
                         "than the number of chunks)")
    shift = torch.full_like(labels, IGNORE_INDEX)
    shift[:, :-1] = labels[:, 1:]
    pad = (-T) % world_size
    if pad:
        input_ids = torch.cat([input_ids, input_ids.new_full((B, pad), pad_token_id)], dim=1)
        shift = torch.cat([shift, shift.new_full((B, pad), IGNORE_INDEX)], dim=1)
    total = T + pad
    start, end = chunk_bounds(total, world_size)[rank]
    positions = torch.arange(start, end, device=input_ids.device).expand(B, -1)
    return {"input_ids": input_ids[:, start:end], "position_ids": positions, "shift_labels": shift[:, start:end],
            "num_items": int((shift != IGNORE_INDEX).sum()), "total_length": total}


def check_sequence_parallel_support(model) -> None:
    """Refuse, by name, a model whose token mixers do not declare ``supports_sequence_parallel`` (or that has none of
    ours: transformers' own layers would silently attend within each chunk only)."""
    from .layers.mixer_registry import TOKEN_MIXERS

    mixer_classes = tuple(TOKEN_MIXERS.values())
    mixers = [(name, module) for name, module in model.named_modules() if isinstance(module, mixer_classes)]
    if not mixers:
        raise ValueError(f"sequence parallelism needs an hf-arch model; {type(model).__name__} has none of our token "
                         "mixers (its layers would attend within each chunk only)")
    unsupported = sorted({f"{type(m).__name__} ({name})" for name, m in mixers
                          if not getattr(m, "supports_sequence_parallel", False)})
    if unsupported:
        raise ValueError(f"sequence parallelism is not supported by: {', '.join(unsupported[:4])}"
                         f"{' …' if len(unsupported) > 4 else ''}")


def sequence_parallel_loss(model, chunk: dict) -> torch.Tensor:
    """This rank's share of the batch's mean next-token loss (inside :func:`sequence_parallel`)."""
    if active_plan() is None:
        raise RuntimeError("sequence_parallel_loss: call it inside hf_arch.sequence_parallel.sequence_parallel(...)")
    check_sequence_parallel_support(model)
    if hasattr(model, "_orig_mod"):
        raise ValueError("sequence parallelism runs eager models: a torch.compile'd forward would not exchange states "
                         "across ranks (train without torch_compile)")
    logits = model(input_ids=chunk["input_ids"], position_ids=chunk["position_ids"], use_cache=False).logits
    wide = torch.promote_types(logits.dtype, torch.float32)
    nll = torch.nn.functional.cross_entropy(logits.to(wide).flatten(0, 1), chunk["shift_labels"].flatten(),
                                            ignore_index=IGNORE_INDEX, reduction="sum")
    return nll / max(chunk["num_items"], 1)


def all_reduce_gradients(model, group=None) -> None:
    """Sum every parameter's gradient over the sequence-parallel group (each rank holds its chunk's share)."""
    for parameter in model.parameters():
        if parameter.grad is not None:
            dist.all_reduce(parameter.grad, group=group)


def _sequence_parallel_size(trainer) -> int:
    size = getattr(trainer, "_sequence_parallel_size", None)
    return int(size if size is not None else getattr(trainer.args, "sequence_parallel_size", 1) or 1)


def _gather_batches(inputs: dict, group, world_size: int) -> list[dict]:
    """Every rank's batch (the tensors the LM loss needs), on every rank; equal shapes required."""
    keys = [k for k in ("input_ids", "labels", "attention_mask") if inputs.get(k) is not None]
    shape = torch.tensor(list(inputs["input_ids"].shape), device=inputs["input_ids"].device)
    shapes = [torch.empty_like(shape) for _ in range(world_size)]
    dist.all_gather(shapes, shape, group=group)
    if any(not torch.equal(s, shape) for s in shapes):
        raise ValueError("sequence parallelism: every process's batch must have the same shape (got "
                         f"{[tuple(s.tolist()) for s in shapes]}); pack the text into fixed-length blocks")
    gathered = {}
    for key in keys:
        parts = [torch.empty_like(inputs[key]) for _ in range(world_size)]
        dist.all_gather(parts, inputs[key].contiguous(), group=group)
        gathered[key] = parts
    return [{key: gathered[key][j] for key in keys} for j in range(world_size)]


class SequenceParallelMixin:
    """For a transformers ``Trainer`` subclass: with ``sequence_parallel_size`` equal to the number of processes,
    each optimizer step trains every process's batch in turn, split along the sequence over all processes (LASP-2).
    The parameter gradients are then exactly those of data-parallel training on the same batches (every process's
    batch a mean over its tokens, DDP averaging the processes), at 1/world of each sequence's activations per
    process. The objective is the next-token loss; attention-transfer or distillation objectives are refused."""

    def _sequence_parallel_group(self):
        if getattr(self, "_sp_group", None) is None:
            self._sp_group = dist.new_group(list(range(dist.get_world_size())))  # apart from DDP's default group
        return self._sp_group

    def training_step(self, model, inputs, num_items_in_batch=None):
        size = _sequence_parallel_size(self)
        if size <= 1:
            return super().training_step(model, inputs, num_items_in_batch)
        world = dist.get_world_size() if dist.is_initialized() else 1
        if size != world:
            raise ValueError(f"sequence_parallel_size {size} must equal the number of processes ({world}): "
                             "sequence parallelism alongside data parallelism is not supported")
        if self.args.torch_compile:
            raise ValueError("sequence_parallel_size > 1 trains eager models: torch_compile would not exchange states "
                             "across processes")
        if getattr(self, "objective", "lm") != "lm" or getattr(self, "teacher", None) is not None:
            raise ValueError("sequence parallelism trains the next-token objective only (no attention transfer, "
                             "gate distillation or teacher distillation)")
        model.train()
        inputs = self._prepare_inputs(inputs)
        group = self._sequence_parallel_group()
        rank = dist.get_rank(group)
        pad = getattr(getattr(self, "processing_class", None), "pad_token_id", None) or 0
        total = None
        batches = _gather_batches(inputs, group, world)
        for j, batch in enumerate(batches):
            chunk = split_batch(batch, rank, world, pad_token_id=pad)
            last = j == len(batches) - 1
            sync = contextlib.nullcontext() if last else self.accelerator.no_sync(model)
            with sync, sequence_parallel(group, total_length=chunk["total_length"]):
                loss = sequence_parallel_loss(model, chunk) / self.current_gradient_accumulation_steps
                self.accelerator.backward(loss)
            total = loss.detach() if total is None else total + loss.detach()
        self.sequence_parallel_batches = getattr(self, "sequence_parallel_batches", 0) + len(batches)
        return total


class SequenceParallelTrainer(SequenceParallelMixin, Trainer):
    """``Trainer`` with ``sequence_parallel_size`` (default: ``args.sequence_parallel_size`` if the arguments have
    it, else 1). Launch with ``accelerate launch`` / ``torchrun`` on as many processes."""

    def __init__(self, *args, sequence_parallel_size: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._sequence_parallel_size = sequence_parallel_size
