"""GradMAP stage-1 weight-gradient scores with the reduction fused into each linear layer's backward.

:func:`gradmap.scoring.layer_scores` lets autograd produce every weight gradient ``dW`` (one at a time) and reduces it
in a post-accumulate-grad hook. Here no parameter requires grad at all: every ``nn.Linear`` of the decoder layers runs
through :class:`ScoredLinear`, whose backward returns the input gradient ``dX = dy W`` as usual and hands
``(x, dy, W)`` to :func:`~gradmap.kernels.grad_reduce.linear_grad_reduce`, which reduces ``dW = dyᵀ x`` tile by
tile (Triton) or chunk by chunk (PyTorch) into the layer's fp32 score; a full ``dW`` is never written to memory.

Scores (GradMAP, Li et al., arXiv 2602.14649, Sec. 3, stage 1; Taylor: Kim et al., arXiv 2402.02834, Eq. 2), summed
over the 2-D weights ``W`` of layer *l* and over micro-batches *b* (``L_b`` = summed token CE of *b* / all targets):

* ``grad_l1``: :math:`S_l = \\sum_b \\sum_W \\sum_{ij} |\\partial L_b/\\partial W_{ij}|`
* ``grad_l2``: :math:`S_l = \\sum_b \\sum_W \\sum_{ij} (\\partial L_b/\\partial W_{ij})^2`
* ``taylor``:  :math:`S_l = \\sum_b \\sum_W \\sum_{ij} |W_{ij}\\, \\partial L_b/\\partial W_{ij}|`

exactly what :func:`gradmap.scoring.layer_scores` computes (same micro-batching, same loss), so the two agree to
fp32 rounding.

Requirements: the scored matrices of each layer (:func:`gradmap.scoring.layer_matrices`) must be exactly the weights
of the ``nn.Linear`` modules inside it (true for Llama, Mistral, Qwen2, Qwen3), and each such module must be called
once per forward (a module applied twice would have its two contributions reduced separately, which is wrong for
these non-linear sums; :func:`fused_layer_scores` checks this).

Padding: :func:`gradmap.scoring.lm_loss_sum` excludes padded targets, and with right padding no real token attends
to a padded one, so ``dy`` is exactly zero on padded rows and they add nothing to ``dW``; no token mask is passed.
"""

from __future__ import annotations

import contextlib
import time
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..adapters import Adapter, get_adapter, model_device
from ..data import Calibration
from ..scoring import WEIGHT_METRICS, ScoreStats, _only_grad, layer_matrices, lm_loss_sum, num_targets
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


def _scored_linears(layers: nn.ModuleList) -> list[tuple[int, str, nn.Linear]]:
    """``(layer index, qualified name, module)`` for every ``nn.Linear`` of ``layers``, after checking that their
    weights are exactly each layer's :func:`~gradmap.scoring.layer_matrices`.

    Raises:
        ValueError: naming a 2-D matrix that is not an ``nn.Linear`` weight (or the reverse).
    """
    found = []
    for i, layer in enumerate(layers):
        linears = [(name, m) for name, m in layer.named_modules() if isinstance(m, nn.Linear)]
        have = {id(m.weight) for _, m in linears}
        want = {id(p) for p in layer_matrices(layer)}
        if have != want:
            names = {id(p): n for n, p in layer.named_parameters()}
            odd = sorted(names.get(k, "?") for k in have ^ want)
            raise ValueError(f"fused scoring: layer {i} has 2-D matrices that are not nn.Linear weights (or the "
                             f"reverse): {odd}; use gradmap.scoring.layer_scores for this model")
        found += [(i, name, m) for name, m in linears]
    return found


@contextlib.contextmanager
def fused_linear_scoring(model: nn.Module, layers: nn.ModuleList, metric: str, acc: torch.Tensor, *,
                         backend: Optional[str] = None, chunk_rows: int = 0, calls: Optional[dict] = None):
    """Route every ``nn.Linear`` of ``layers`` through :class:`ScoredLinear` while the context is open.

    Inside the context: every parameter of ``model`` has ``requires_grad=False`` (flags restored on exit, ``.grad``
    cleared); the input-embedding output is made a leaf that requires grad (forward hook
    ``o.detach().requires_grad_()``), so the hidden states carry grad; and each Linear's ``forward`` is replaced (an
    instance attribute, removed on exit) by one that, with grad enabled, adds its weight-gradient sum to
    ``acc[layer index]`` during the backward. Under ``torch.no_grad()`` the Linears compute a plain ``F.linear``.

    Args:
        model: the ``*ForCausalLM``.
        layers: its decoder layers (``Adapter.layers(model)``).
        metric: ``grad_l1``, ``grad_l2`` or ``taylor``.
        acc: fp32 ``[len(layers)]`` accumulator on the model's device (added to, not reset).
        backend, chunk_rows: passed to :func:`~gradmap.kernels.grad_reduce.linear_grad_reduce`.
        calls: optional dict, filled with ``{module qualified name: number of forward calls}`` (for checks).

    Raises:
        ValueError: unknown metric, ``acc`` of the wrong shape/dtype, or a layer whose 2-D matrices are not exactly
            its ``nn.Linear`` weights.
        RuntimeError: (at forward time) a Linear input that does not require grad with grad enabled, which would
            silently skip its score.
    """
    if metric not in WEIGHT_METRICS:
        raise ValueError(f"metric: {metric!r} is not a weight-gradient metric; accepted: {', '.join(WEIGHT_METRICS)}")
    if acc.shape != (len(layers),) or acc.dtype != torch.float32:
        raise ValueError(f"acc: must be fp32 [{len(layers)}], got {acc.dtype} {tuple(acc.shape)}")
    targets = _scored_linears(layers)

    def make_forward(slot, name, module):
        def forward(x):
            if calls is not None:
                calls[name] = calls.get(name, 0) + 1
            if not torch.is_grad_enabled():
                return F.linear(x, module.weight, module.bias)
            if not x.requires_grad:
                raise RuntimeError(f"fused scoring: the input of {name} does not require grad, so its weight "
                                   "gradient would never be scored")
            return ScoredLinear.apply(x, module.weight, module.bias, acc, slot, metric, backend, chunk_rows)
        return forward

    patched = []
    embed_handle = None
    with _only_grad(model, []):
        try:
            for i, name, module in targets:
                had = "forward" in module.__dict__
                patched.append((module, had, module.__dict__.get("forward")))
                module.forward = make_forward(i, f"layers.{i}.{name}", module)
            embed_handle = model.get_input_embeddings().register_forward_hook(
                lambda m, args, out: out.detach().requires_grad_())
            yield
        finally:
            if embed_handle is not None:
                embed_handle.remove()
            for module, had, old in reversed(patched):
                if had:
                    module.forward = old
                else:
                    del module.forward


def fused_layer_scores(model: nn.Module, calibration: Calibration, metric: str = "taylor", *, micro_batch: int = 8,
                       adapter: Optional[Adapter] = None, progress: bool = False, backend: Optional[str] = None,
                       chunk_rows: int = 0) -> tuple[torch.Tensor, ScoreStats]:
    """Same contract as :func:`gradmap.scoring.layer_scores` for ``grad_l1`` / ``grad_l2`` / ``taylor``, with the
    weight-gradient reduction fused into each linear layer's backward (no weight gradient is ever materialized).

    Args:
        model: ``*ForCausalLM`` supported by :mod:`gradmap.adapters`, in eval mode, whose decoder layers' 2-D matrices
            are all ``nn.Linear`` weights.
        calibration: the calibration set.
        metric: ``grad_l1``, ``grad_l2`` or ``taylor`` (formulas in the module docstring).
        micro_batch: windows per forward/backward; the scores are summed over micro-batches.
        backend: ``triton``/``torch``/``auto`` (None: ``$GRADMAP_GRAD_REDUCE``, then by device).
        chunk_rows: dW rows per chunk on the ``torch`` path (0: automatic).

    Returns:
        ``(scores, stats)``: fp32 tensor ``[num_layers]`` on CPU (position *i* = current layer *i*), and the cost.
        The model's parameters are left as they were (``requires_grad`` flags restored, no ``.grad``).

    Raises:
        ValueError: a metric other than the three above; a layer with 2-D matrices that are not Linear weights; a
            Linear called more than once per forward; a non-finite score (fp16 overflow: rerun in bf16/fp32).
    """
    if metric not in WEIGHT_METRICS:
        raise ValueError(f"metric: {metric!r} is not one of {', '.join(WEIGHT_METRICS)} (fused scoring covers the "
                         "weight-gradient metrics; use gradmap.scoring.layer_scores for the others)")
    adapter = adapter or get_adapter(model)
    layers = adapter.layers(model)
    device = model_device(model)
    total = num_targets(calibration)
    acc = torch.zeros(len(layers), dtype=torch.float32, device=device)
    batches = list(calibration.batches(micro_batch))
    calls: dict = {}
    start = time.perf_counter()
    n_batches = 0
    with fused_linear_scoring(model, layers, metric, acc, backend=backend, chunk_rows=chunk_rows, calls=calls):
        for ids, mask in tqdm(batches, desc=f"scoring ({metric}, fused)", disable=not progress, leave=False):
            calls.clear()
            loss, _ = lm_loss_sum(model, ids, mask)
            twice = sorted(name for name, n in calls.items() if n > 1)
            if twice:
                raise ValueError(f"fused scoring: {twice} ran more than once in one forward; their weight "
                                 "gradients would be reduced per call; use gradmap.scoring.layer_scores")
            (loss / total).backward()
            n_batches += 1
    scores = acc.cpu()
    if not torch.isfinite(scores).all():
        raise ValueError(f"non-finite layer scores ({metric}): the gradients overflowed; "
                         "use dtype bfloat16 or float32 instead of float16")
    return scores, ScoreStats(time.perf_counter() - start, n_batches, calibration.num_tokens)
