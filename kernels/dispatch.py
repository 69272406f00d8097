"""Backend selection for the public ops: by the tensors' device at call time, overridable, logged once.

Order of precedence: the call's ``backend=`` argument, then ``HF_ARCH_KERNEL_BACKEND`` (for the ops that have the
backend it names), then the device default (on CUDA fla's kernels where installed, then ours in Triton, otherwise
``torch``). Choosing per call (never at import) keeps CPU tensors
working on machines where triton is installed.
"""

from __future__ import annotations

import logging
import os
from typing import Callable

import torch

logger = logging.getLogger(__name__)
ENV_VAR = "HF_ARCH_KERNEL_BACKEND"
_logged: set[tuple[str, str, str]] = set()


def select_backend(op: str, implementations: dict[str, Callable], tensor: torch.Tensor, backend: str | None = None) -> Callable:
    """Return the implementation of ``op`` to run on ``tensor``'s device."""
    default = _device_default(implementations, tensor)
    requested = backend or os.environ.get(ENV_VAR) or default
    if backend is None and requested not in implementations and requested in KNOWN_BACKENDS:
        # a global choice covers the ops that have it; the others keep their device default (e.g. fla has no
        # sliding-window kernel)
        _log_once((op, requested, "missing"), "%s: no %s backend, using %s", op, requested, default)
        requested = default
    if requested not in implementations:
        raise ValueError(
            f"{op}: backend {requested!r} is not available (from {'backend=' if backend else ENV_VAR}); "
            f"choose one of {sorted(implementations)}"
        )
    slow = " (pure-PyTorch fallback)" if tensor.is_cuda and requested == "torch" else ""
    _log_once((op, requested, tensor.device.type), "%s: using the %s backend on %s%s", op, requested,
              tensor.device.type, slow)
    return implementations[requested]


# Every backend some op implements: a global choice among these is applied where available, others are typos.
KNOWN_BACKENDS = ("torch", "triton", "fla")
# On CUDA: fla's chunked kernels where installed (GLA, gated delta rule, KDA), then ours in Triton, then PyTorch.
CUDA_PREFERENCE = ("fla", "triton", "torch")


def _device_default(implementations: dict[str, Callable], tensor: torch.Tensor) -> str:
    if tensor.is_cuda:
        return next((name for name in CUDA_PREFERENCE if name in implementations), "torch")
    return "torch"


def _log_once(key: tuple[str, str, str], message: str, *args) -> None:
    if key not in _logged and not torch.compiler.is_compiling():  # logging would break a fullgraph trace
        _logged.add(key)
        logger.info(message, *args)
