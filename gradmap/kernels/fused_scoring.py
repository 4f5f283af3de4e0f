"""GradMAP stage-1 weight-gradient scores with the reduction fused into each linear layer's backward.

The hooks backend (:mod:`gradmap.methods.metrics`) lets autograd produce every weight gradient ``dW`` of a layer (one
at a time) and reduces it in a post-accumulate-grad hook. Here no parameter requires grad at all: every
``nn.Linear`` of the decoder layer being back-propagated runs through :class:`ScoredLinear`, whose backward returns
the input gradient ``dX = dy W`` as usual and hands ``(x, dy, W)`` to
:func:`~gradmap.kernels.grad_reduce.linear_grad_reduce`, which reduces ``dW = dyᵀ x`` tile by tile (Triton) or
chunk by chunk (PyTorch) into the layer's fp32 score; a full ``dW`` is never written to memory.

Scores (GradMAP, Li et al., arXiv 2602.14649, Sec. 3, stage 1; Taylor: Kim et al., arXiv 2402.02834, Eq. 2), summed
over the 2-D weights ``W`` of layer *l* and over micro-batches *b* (``L_b`` = summed token CE of *b* / all targets):

* ``grad_l1``: :math:`S_l = \\sum_b \\sum_W \\sum_{ij} |\\partial L_b/\\partial W_{ij}|`
* ``grad_l2``: :math:`S_l = \\sum_b \\sum_W \\sum_{ij} (\\partial L_b/\\partial W_{ij})^2`
* ``taylor``:  :math:`S_l = \\sum_b \\sum_W \\sum_{ij} |W_{ij}\\, \\partial L_b/\\partial W_{ij}|`

exactly what the hooks backend computes (same micro-batching, same loss), so the two agree to fp32 rounding.

Requirements: a layer's 2-D parameters must be exactly the weights of the ``nn.Linear`` modules inside it (true for
Llama, Mistral, Qwen2, Qwen3, Gemma; not GPT-2's ``Conv1D``), and each such module must be called once per forward
(a module applied twice would have its two contributions reduced separately, which is wrong for these non-linear
sums; :func:`fused_layer_scope` checks this).

Padding: padded targets are excluded from the loss, and with right padding no real token attends to a padded one, so
``dy`` is exactly zero on padded rows and they add nothing to ``dW``; no token mask is passed.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .grad_reduce import METRIC_INDEX, linear_grad_reduce


class ScoredLinear(torch.autograd.Function):
    """``y = x Wᵀ + b`` whose backward adds one metric sum of ``dW = dyᵀ x`` to ``acc[slot]`` instead of making dW.

    ``ScoredLinear.apply(x, weight, bias, acc, slot, metric, backend=None, chunk_rows=0)``

    Args:
        x: input ``[..., in]`` (must require grad for the backward to run; the scored forward checks it).
        weight: ``[out, in]``, must not require grad (no gradient is produced for it).
        bias: ``[out]`` or None, must not require grad.
        acc: fp32 accumulator tensor (e.g. ``[num_layers]``) on x's device; ``acc[slot]`` is increased in place
            during the backward by Σ|dW| (``grad_l1``), Σ dW² (``grad_l2``) or Σ|W⊙dW| (``taylor``).
        slot: index into ``acc``.
        metric: ``grad_l1``, ``grad_l2`` or ``taylor``.
        backend, chunk_rows: passed to :func:`~gradmap.kernels.grad_reduce.linear_grad_reduce`.

    Returns:
        ``y [..., out]`` (the backward returns ``dX = dy W``, ``[..., in]``, and None for every other input).

    Raises:
        ValueError: a weight/bias that requires grad, or an unknown metric.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, acc, slot, metric, backend=None, chunk_rows=0):
        if metric not in METRIC_INDEX:
            raise ValueError(f"metric: {metric!r} is not one of {', '.join(METRIC_INDEX)}")
        if weight.requires_grad or (bias is not None and bias.requires_grad):
            raise ValueError("ScoredLinear: weight and bias must not require grad (no weight gradient is produced)")
        ctx.save_for_backward(x, weight)
        ctx.acc, ctx.slot, ctx.index = acc, slot, METRIC_INDEX[metric]
        ctx.backend, ctx.chunk_rows = backend, chunk_rows
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        dx = dy.matmul(weight.to(dy.dtype)) if ctx.needs_input_grad[0] else None
        with torch.no_grad():
            sums = linear_grad_reduce(x, dy, weight, backend=ctx.backend, chunk_rows=ctx.chunk_rows)
            ctx.acc[ctx.slot] += sums[ctx.index].to(ctx.acc.device)
        return dx, None, None, None, None, None, None, None


def scored_linears(layer: nn.Module, metric: str, acc: torch.Tensor, slot: int, *, backend: Optional[str] = None,
                   chunk_rows: int = 0) -> list[tuple[str, nn.Linear]]:
    """The ``nn.Linear`` modules of one decoder layer, after checking that their weights are exactly the layer's 2-D
    parameters (the matrices the weight metrics score).

    Raises:
        ValueError: unknown metric, ``acc`` not fp32, ``slot`` out of range, or a 2-D parameter that is not an
            ``nn.Linear`` weight (or the reverse), naming it.
    """
    if metric not in METRIC_INDEX:
        raise ValueError(f"metric: {metric!r} is not a weight-gradient metric; accepted: {', '.join(METRIC_INDEX)}")
    if acc.dtype != torch.float32 or not 0 <= slot < acc.numel():
        raise ValueError(f"acc: need an fp32 accumulator with a slot {slot}, got {acc.dtype} {tuple(acc.shape)}")
    linears = [(name, m) for name, m in layer.named_modules() if isinstance(m, nn.Linear)]
    have = {id(m.weight) for _, m in linears}
    want = {id(p) for p in layer.parameters() if p.dim() == 2}
    if have != want:
        names = {id(p): n for n, p in layer.named_parameters()}
        odd = sorted(names.get(k, "?") for k in have ^ want)
        raise ValueError(f"--backend fused: this decoder layer has 2-D matrices that are not nn.Linear weights (or "
                         f"the reverse): {odd}; use --backend hooks for this model")
    return linears


@contextlib.contextmanager
def fused_layer_scope(layer: nn.Module, metric: str, acc: torch.Tensor, slot: int, *, backend: Optional[str] = None,
                      chunk_rows: int = 0):
    """Route every ``nn.Linear`` of ONE decoder layer through :class:`ScoredLinear` while the context is open, so
    that a backward through the layer adds its weight-gradient sum (``metric``) to ``acc[slot]`` without forming
    any dW. The engine's reverse sweep enters this scope for each layer (:mod:`gradmap.methods.metrics`).

    Each Linear's ``forward`` is replaced (an instance attribute, removed on exit). Under ``torch.no_grad()`` the
    Linears compute a plain ``F.linear``. The layer's parameters must not require grad.

    Raises:
        ValueError: see :func:`scored_linears`; (at backward time) a Linear called more than once in one forward,
            whose two contributions would be reduced separately (wrong for these non-linear sums).
        RuntimeError: (at forward time) a Linear input that does not require grad with grad enabled, which would
            silently skip its score.
    """
    linears = scored_linears(layer, metric, acc, slot, backend=backend, chunk_rows=chunk_rows)
    calls: dict[str, int] = {}

    def make_forward(name, module):
        def forward(x):
            if not torch.is_grad_enabled():
                return F.linear(x, module.weight, module.bias)
            calls[name] = calls.get(name, 0) + 1
            if calls[name] > 1:
                raise ValueError(f"--backend fused: {name} ran more than once in one forward; its weight gradient "
                                 "would be reduced per call; use --backend hooks")
            if not x.requires_grad:
                raise RuntimeError(f"fused scoring: the input of {name} does not require grad, so its weight "
                                   "gradient would never be scored")
            return ScoredLinear.apply(x, module.weight, module.bias, acc, slot, metric, backend, chunk_rows)
        return forward

    patched = []
    try:
        for name, module in linears:
            patched.append((module, module.__dict__.get("forward")))
            module.forward = make_forward(name, module)
        yield calls  # the caller clears it between forwards
    finally:
        for module, old in reversed(patched):
            if old is not None:
                module.forward = old
            else:
                module.__dict__.pop("forward", None)
