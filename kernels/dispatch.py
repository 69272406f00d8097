"""Backend selection for the public ops: by the tensors' device at call time, overridable, logged once.

Order of precedence: the call's ``backend=`` argument, then ``HF_ARCH_KERNEL_BACKEND``, then the device default
(``triton`` on CUDA when an op has it, otherwise ``torch``). Choosing per call (never at import) keeps CPU tensors
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
    requested = backend or os.environ.get(ENV_VAR) or None
    if requested is None:
        requested = "triton" if tensor.is_cuda and "triton" in implementations else "torch"
    if backend is None and requested not in implementations and set(implementations) == {"torch"}:
        requested = "torch"  # a global backend choice does not apply to ops that only have the PyTorch path
    if requested not in implementations:
        raise ValueError(
            f"{op}: backend {requested!r} is not available (from {'backend=' if backend else ENV_VAR}); "
            f"choose one of {sorted(implementations)}"
        )
    key = (op, requested, tensor.device.type)
    if key not in _logged and not torch.compiler.is_compiling():  # logging would break a fullgraph trace
        _logged.add(key)
        slow = " (pure-PyTorch fallback)" if tensor.is_cuda and requested != "triton" else ""
        logger.info("%s: using the %s backend on %s%s", op, requested, tensor.device.type, slow)
    return implementations[requested]
