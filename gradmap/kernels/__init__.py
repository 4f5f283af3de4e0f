"""Kernels: each next to its PyTorch reference (and tested against it).

* :mod:`~gradmap.kernels.grad_reduce`: the op ``gradmap::linear_grad_reduce`` (Triton kernel on CUDA / under
  ``TRITON_INTERPRET=1``, chunked PyTorch elsewhere) and its naive reference.
* :mod:`~gradmap.kernels.fused_scoring`: :class:`ScoredLinear` and :func:`fused_layer_scope`, the per-layer scope
  the engine's reverse sweep enters for the weight metrics (``--backend fused``).
* :mod:`~gradmap.kernels.linear_cross_entropy`: ``linear_cross_entropy`` (the op ``gradmap::linear_cross_entropy_fwd``),
  the LM-head projection and summed next-token loss with its input gradient, a chunk of tokens' logits at a time
  (Triton kernel on CUDA, chunked PyTorch on the CPU), and its full-logits reference. Import it from its module
  (the package does not re-export it under the module's own name).

Importing this package does not import triton; the kernels are built on first use.
"""

from .grad_reduce import (BACKENDS, ENV_BACKEND, METRIC_INDEX, linear_grad_reduce, reference_linear_grad_reduce,
                          resolve_backend, triton_interpreting)
from .fused_scoring import ScoredLinear, fused_layer_scope

__all__ = ["BACKENDS", "ENV_BACKEND", "METRIC_INDEX", "linear_grad_reduce", "reference_linear_grad_reduce",
           "resolve_backend", "triton_interpreting", "ScoredLinear", "fused_layer_scope"]
