"""Fused kernels for GradMAP scoring: weight-gradient metric sums reduced inside the backward pass.

* :mod:`~gradmap.kernels.grad_reduce`: the op ``gradmap::linear_grad_reduce`` (Triton kernel on CUDA / under
  ``TRITON_INTERPRET=1``, chunked PyTorch elsewhere) and its naive reference.
* :mod:`~gradmap.kernels.fused_scoring`: :class:`ScoredLinear`, :func:`fused_linear_scoring` and
  :func:`fused_layer_scores`, the drop-in for :func:`gradmap.scoring.layer_scores` on the weight metrics.
* :mod:`~gradmap.kernels.linear_cross_entropy`: :func:`linear_cross_entropy` (the op
  ``gradmap::linear_cross_entropy_fwd``), the LM-head projection and summed next-token loss, with its input gradient,
  a chunk of tokens' logits at a time (Triton kernel on CUDA, chunked PyTorch on the CPU); its full-logits reference.

Importing this package does not import triton; the kernel is built on first use.
"""

from .grad_reduce import (BACKENDS, ENV_BACKEND, METRIC_INDEX, linear_grad_reduce, reference_linear_grad_reduce,
                          resolve_backend, triton_interpreting)
from .fused_scoring import ScoredLinear, fused_layer_scores, fused_linear_scoring
from .linear_cross_entropy import default_chunk_size, linear_cross_entropy, reference_linear_cross_entropy

__all__ = ["BACKENDS", "ENV_BACKEND", "METRIC_INDEX", "linear_grad_reduce", "reference_linear_grad_reduce",
           "resolve_backend", "triton_interpreting", "ScoredLinear", "fused_layer_scores", "fused_linear_scoring",
           "default_chunk_size", "linear_cross_entropy", "reference_linear_cross_entropy"]
