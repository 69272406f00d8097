"""Mixture-of-Experts expert computation: a grouped SwiGLU MLP over routed (token, expert) assignments.

``naive`` is the spec (a masked loop over experts in fp32), ``grouped`` the PyTorch path (sort by expert, one
matmul pair per non-empty expert), ``triton_moe`` the grouped-GEMM Triton kernels. The public entry point is
:func:`hf_arch.kernels.ops.expert_mlp`. Nothing is imported here, so importing the package never pulls in triton.
"""
