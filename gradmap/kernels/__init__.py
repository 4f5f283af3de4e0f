"""Fused kernels for GradMAP scoring: weight-gradient metric sums reduced inside the backward pass.

* :mod:`~gradmap.kernels.grad_reduce`: the op ``gradmap::linear_grad_reduce`` (Triton kernel on CUDA / under
  ``TRITON_INTERPRET=1``, chunked PyTorch elsewhere) and its naive reference.
* :mod:`~gradmap.kernels.fused_scoring`: :class:`ScoredLinear` and :func:`fused_layer_scope`, the per-layer scope
  the engine's reverse sweep enters for the weight metrics (``--backend fused``).
* :mod:`~gradmap.kernels.linear_cross_entropy`: the LM loss without materialising the ``[tokens, vocabulary]`` logits.

Importing this package does not import triton; the kernel is built on first use.
"""

from .grad_reduce import (BACKENDS, ENV_BACKEND, METRIC_INDEX, linear_grad_reduce, reference_linear_grad_reduce,
                          resolve_backend, triton_interpreting)
from .fused_scoring import ScoredLinear, fused_layer_scope

__all__ = ["BACKENDS", "ENV_BACKEND", "METRIC_INDEX", "linear_grad_reduce", "reference_linear_grad_reduce",
           "resolve_backend", "triton_interpreting", "ScoredLinear", "fused_layer_scope"]
