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

import torch
import torch.distributed as dist

from .kernels.lasp2 import active_plan, chunk_bounds, sequence_parallel

__all__ = ["split_batch", "sequence_parallel_loss", "sequence_parallel", "all_reduce_gradients", "IGNORE_INDEX"]

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


def sequence_parallel_loss(model, chunk: dict) -> torch.Tensor:
    """This rank's share of the batch's mean next-token loss (inside :func:`sequence_parallel`)."""
    if active_plan() is None:
        raise RuntimeError("sequence_parallel_loss: call it inside hf_arch.sequence_parallel.sequence_parallel(...)")
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
