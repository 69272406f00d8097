"""Tensor ops (naive reference, chunked PyTorch, Triton), installed as ``hf_arch.kernels``.

Keep this file free of side effects and of ``__version__``: from the repo root this folder is importable as a
top-level ``kernels``, a name transformers probes for the Hub kernels library.
"""
