"""Copying a source checkpoint's tensors into a converted model: by name, shape-checked, verified afterwards."""

from __future__ import annotations

import copy
import re

import torch

__all__ = ["copy_source_weights", "check_copied", "build_from_source"]


@torch.no_grad()
def copy_source_weights(source_state: dict, target_state: dict, added: set[str], replaced: str | None = None,
                        sides: tuple[str, str] = ("source", "target")) -> None:
    """Copy every source tensor into the target tensor of the same name.

    ``added``: target names a conversion creates (they have no source). ``replaced``: a regex on source names the
    conversion maps itself (e.g. the dense FFN a MoE refactorization splits); those are neither copied nor required
    in the target. Raises ``ValueError`` naming the tensors when the two sides do not line up or a shape differs;
    ``sides`` names the two in that message (a linearization says teacher / student).
    """
    pattern = re.compile(replaced) if replaced else None
    source = {n: t for n, t in source_state.items() if not (pattern and pattern.search(n))}
    unexpected = sorted(set(source) - set(target_state))
    missing = sorted(set(target_state) - set(source) - added)
    if pattern is not None:  # target tensors filled from the replaced source tensors
        missing = [n for n in missing if not pattern.search(n)]
    if unexpected or missing:
        raise ValueError(
            "Source and target parameters do not line up: "
            f"source-only {unexpected[:5]}{'…' if len(unexpected) > 5 else ''}, "
            f"target-only {missing[:5]}{'…' if len(missing) > 5 else ''}"
        )
    for name, tensor in source.items():
        if target_state[name].shape != tensor.shape:
            raise ValueError(f"Shape mismatch for {name}: {sides[0]} {tuple(tensor.shape)}, "
                             f"{sides[1]} {tuple(target_state[name].shape)}")
        target_state[name].copy_(tensor)


def check_copied(source_state: dict, target_state: dict, replaced: str | None = None) -> None:
    """Every (not replaced) source tensor is bit-identical in the finished target (ties and inits included)."""
    pattern = re.compile(replaced) if replaced else None
    for name, tensor in source_state.items():
        if pattern is not None and pattern.search(name):
            continue
        if not torch.equal(target_state[name], tensor):
            raise RuntimeError(f"Weight {name} was not copied exactly")


@torch.no_grad()
def build_from_source(source_model, config, model_class, init_new_parameters, replaced: str | None = None,
                      sides: tuple[str, str] = ("source", "target")):
    """The one builder every conversion that starts from a source checkpoint uses: ``model_class(config)`` in the
    source's dtype and attention backend, every source tensor copied by name (``copy_source_weights``; ``replaced``:
    the source tensors the conversion maps itself, e.g. the dense FFN a MoE refactorization splits), then
    ``init_new_parameters(model)`` sets everything else explicitly (never rely on load-time init), embeddings are
    re-tied, every copy is checked bit for bit and the generation config carried over."""
    from ..peft_utils import new_parameter_names

    config._attn_implementation = source_model.config._attn_implementation
    target = model_class(config).to(next(source_model.parameters()).dtype)
    source_state = source_model.state_dict()
    copy_source_weights(source_state, target.state_dict(), set(new_parameter_names(target)), replaced=replaced,
                        sides=sides)
    init_new_parameters(target)
    if config.tie_word_embeddings:
        target.tie_weights()
    check_copied(source_state, target.state_dict(), replaced=replaced)
    target.generation_config = copy.deepcopy(source_model.generation_config)
    return target.eval()


def build_grown(source_model, config, model_class, state: dict):
    """A grown model (more heads, more parameter tokens) from the source's state rewritten to the grown shapes:
    every tensor must line up (the tied LM head aside); embeddings re-tied, generation config carried over."""
    target = model_class(config).to(next(source_model.parameters()).dtype)
    missing, unexpected = target.load_state_dict(state, strict=False)
    missing = [n for n in missing if not (config.tie_word_embeddings and n == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"grown model and source do not line up: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if config.tie_word_embeddings:
        target.tie_weights()
    target.generation_config = source_model.generation_config
    return target.eval()
