"""Stage 1 of GradMAP: score every decoder layer at once from one forward + one backward of the LM loss.

GradMAP (Li et al., arXiv 2602.14649, Sec. 3, stage 1) ranks layers globally by the magnitude of the LM-loss gradient
of their parameters, from a single backward pass. The variants implemented here (:data:`gradmap.names.METRICS`):

* ``grad_l1``: :math:`S_l = \\sum_{W \\in l} \\sum_{ij} |\\partial L/\\partial W_{ij}|`
* ``grad_l2``: :math:`S_l = \\sum_{W \\in l} \\sum_{ij} (\\partial L/\\partial W_{ij})^2`
* ``taylor``: :math:`S_l = \\sum_{W \\in l} \\sum_{ij} |W_{ij}\\,\\partial L/\\partial W_{ij}|`, the first-order Taylor
  importance of Shortened LLaMA (Kim et al., arXiv 2402.02834, Sec. 3.1, Eq. 2).
* ``gate``: a scalar gate :math:`\\alpha_l` multiplies layer *l*'s residual branch,
  :math:`h_{l+1} = h_l + \\alpha_l (f_l(h_l) - h_l)`, evaluated at :math:`\\alpha_l = 1`; the score
  :math:`S_l = -\\partial L/\\partial\\alpha_l = -\\sum_t \\langle g_{l,t}, \\Delta_{l,t}\\rangle` is the first-order
  estimate of the loss increase when the layer is removed (:math:`\\alpha_l: 1 \\to 0`).
* ``taylor_hidden``: :math:`S_l = \\sum_t \\sum_d |g_{l,t,d}\\,\\Delta_{l,t,d}|` with :math:`g_{l,t} = \\partial
  L/\\partial h_{l+1,t}` (gradient w.r.t. the layer's output hidden state at token *t*) and :math:`\\Delta_{l,t} =
  h_{l+1,t} - h_{l,t}` (what the layer adds to the residual stream).
* ``grad_update_norm`` (default): :math:`S_l = \\sum_t \\|g_{l,t}\\|_2\\,\\|\\Delta_{l,t}\\|_2`, the Cauchy-Schwarz
  bound of the per-token first-order loss change :math:`|\\langle g_{l,t}, \\Delta_{l,t}\\rangle|` when the layer is
  removed. The choice of the default is measured in ``docs/metric_selection.md``.

The hidden-state metrics need no weight gradient at all, only the gradients of the hidden states: the engine's
reverse sweep (:meth:`gradmap.engine.Trajectory.backward`) hands each layer's ``(h_l, h_{l+1}, g_l)`` to a reducer
that adds the per-token products to the layer's score and keeps nothing; no ``h_out − h_in`` tensor outlives its
layer's step. ``W`` ranges over the 2-D weight matrices of the decoder layer (q/k/v/o, gate/up/down; biases and norm
weights are not scored); for them the reverse sweep lets each layer's weights require grad while its backward runs
and reduces each ``dW`` as soon as it exists (``backend="hooks"``: a post-accumulate-grad hook reduces and frees it;
``backend="fused"``: :mod:`gradmap.kernels.fused_scoring` reduces inside the linear layers' backward, no dW is
formed). Lower score = less important = removed first.

Micro-batches: the loss is the mean token cross-entropy over all real predicted tokens of the calibration set (all
ranks). Micro-batch *b* contributes :math:`L_b = \\sum_{t \\in b} \\mathrm{CE}_t / N`, so :math:`L = \\sum_b L_b`, and
the reductions are summed over micro-batches. The hidden-state metrics are per token and do not depend on the
micro-batching; the weight metrics reduce each micro-batch's dW (exactly the full-batch metric with one micro-batch).
:func:`reference_layer_scores` computes the same quantities the naive way (the model's own forward, every ``.grad``
stored), the oracle of the tests.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..adapters import get_adapter
from ..data import Calibration
from ..engine import Engine, Trajectory, Windows
from ..kernels.fused_scoring import fused_layer_scope
from ..names import (
    BACKENDS,
    HIDDEN_METRICS,
    WEIGHT_METRICS,
    check_backend,
    check_metric,
)


def layer_matrices(layer: nn.Module) -> list[nn.Parameter]:
    """The 2-D weight matrices of one decoder layer, the parameters the weight metrics score."""
    return [p for p in layer.parameters() if p.dim() == 2]


def reduce_gradient(metric: str, grad: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Reduce one weight gradient to its contribution to the layer score, in fp32.

    Args:
        metric: ``grad_l1``, ``grad_l2`` or ``taylor``.
        grad: ``∂L/∂W``, any shape, fp32/fp16/bf16.
        weight: ``W``, same shape as ``grad``.

    Returns:
        fp32 scalar: Σ|g| (grad_l1), Σg² (grad_l2) or Σ|W⊙g| (taylor).
    """
    # Tensor.sum uses pairwise (cascade) summation; torch.linalg.vector_norm on CPU sums naively and was measured
    # 11.5 % off on a 4096x11008 fp32 matrix, so it is not used here.
    g = grad.float()
    if metric == "grad_l1":
        return g.abs().sum()
    if metric == "grad_l2":
        return g.square().sum()
    if metric == "taylor":
        return (g * weight.float()).abs().sum()
    raise ValueError(f"metric: {metric!r} has no weight-gradient reduction; accepted: {', '.join(WEIGHT_METRICS)}")


def reduce_hidden(metric: str, grad: torch.Tensor, delta: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Reduce one layer's output gradient ``g`` and update ``Δ`` to its score contribution, in fp32.

    Args:
        metric: ``gate`` (−Σ_t ⟨g_t, Δ_t⟩), ``taylor_hidden`` (Σ_t Σ_d |g Δ|) or ``grad_update_norm`` (Σ_t ‖g_t‖ ‖Δ_t‖).
        grad, delta: ``[batch, seqlen, hidden]``.
        mask: ``[batch, seqlen]`` attention mask; padding tokens contribute nothing.

    Returns:
        fp32 scalar.
    """
    g, d = grad.float(), delta.float()
    m = mask.to(device=g.device, dtype=torch.float32)
    if metric == "gate":
        return -((g * d).sum(-1) * m).sum()
    if metric == "taylor_hidden":
        return ((g * d).abs().sum(-1) * m).sum()
    if metric == "grad_update_norm":
        return (g.norm(dim=-1) * d.norm(dim=-1) * m).sum()
    raise ValueError(f"metric: {metric!r} is not a hidden-state metric; accepted: gate, {', '.join(HIDDEN_METRICS)}")


@contextlib.contextmanager
def _weight_hooks(layer: nn.Module, metric: str, acc: torch.Tensor, slot: int):
    """While open: the layer's 2-D weights require grad, and each gradient is reduced into ``acc[slot]`` and freed as
    soon as autograd has accumulated it (at most one weight gradient of the layer exists at a time)."""
    params = layer_matrices(layer)
    handles = []

    def hook(param):
        acc[slot] += reduce_gradient(metric, param.grad, param.detach()).to(acc.device)
        param.grad = None

    try:
        for p in params:
            p.requires_grad_(True)
            handles.append(p.register_post_accumulate_grad_hook(hook))
        yield
    finally:
        for h in handles:
            h.remove()
        for p in params:
            p.requires_grad_(False)
            p.grad = None


@dataclass
class ScoreStats:
    """What one scoring pass cost: wall time (seconds), micro-batches of this rank, tokens (all ranks), and the
    engine work (parameter-tokens) it spent."""

    seconds: float
    micro_batches: int
    tokens: int
    work: float = 0.0


def layer_scores(traj: Trajectory, metric: str = "grad_update_norm", *, backend: str = "hooks"
                 ) -> tuple[torch.Tensor, ScoreStats]:
    """Score every decoder layer of the trajectory's view with one forward + backward (GradMAP stage 1).

    The forward resumes from the trajectory's last valid boundary; the backward is the engine's reverse sweep.
    Scores are summed over this rank's micro-batches and all-reduced, so every rank gets the same scores.

    Args:
        traj: the calibration set's trajectory through the current view (:meth:`gradmap.engine.Engine.trajectory`).
        metric: one of :data:`gradmap.names.METRICS` (formulas in the module docstring).
        backend: for the weight metrics, ``"hooks"`` or ``"fused"`` (module docstring); the others ignore it.

    Returns:
        ``(scores, stats)``: fp32 tensor ``[num_positions]`` on CPU (entry *p* = the layer at position *p*), and the
        cost.

    Raises:
        ValueError: unknown metric/backend, a layer the fused backend cannot handle, or a non-finite score (fp16
            overflow: rerun in bfloat16/float32).
    """
    check_metric(metric)
    check_backend(backend)
    engine = traj.engine
    acc = torch.zeros(traj.n, dtype=torch.float32, device=engine.device)
    start, work0 = time.perf_counter(), engine.work
    reducer: Callable | None = None
    scope: Callable | None = None
    if metric in WEIGHT_METRICS:
        if backend == "fused":
            def scope(position, orig, module):
                return fused_layer_scope(module, metric, acc, position)
        else:
            def scope(position, orig, module):
                return _weight_hooks(module, metric, acc, position)
    else:
        def reducer(position, orig, k, h_in, h_out, g_out):
            acc[position] += reduce_hidden(metric, g_out, h_out - h_in, traj.mask(k))
    traj.backward(reducer, scope=_per_forward(scope) if scope is not None else None,
                  first_layer=metric in WEIGHT_METRICS, desc=f"scoring ({metric})")
    scores = engine.all_reduce_(acc).cpu()
    if not torch.isfinite(scores).all():
        raise ValueError(f"non-finite layer scores ({metric}): the gradients overflowed; "
                         "use dtype bfloat16 or float32 instead of float16")
    return scores, ScoreStats(time.perf_counter() - start, len(traj.batches), traj.num_targets,
                              engine.work - work0)


def score_layers(model: nn.Module, calibration: Calibration, metric: str = "grad_update_norm", *,
                 micro_batch: int = 8, backend: str = "hooks", progress: bool = False
                 ) -> tuple[torch.Tensor, ScoreStats]:
    """:func:`layer_scores` of a resident ``model`` on ``calibration`` in one call (an engine built and closed around
    it; the model is left exactly as it was: values, ``requires_grad`` flags, no ``.grad``).

    Returns:
        ``(scores, stats)``: fp32 ``[num_layers]`` on CPU and the cost.
    """
    with Engine.for_module(model, progress=progress) as engine:
        traj = engine.trajectory(Windows.from_calibration(calibration, micro_batch))
        return layer_scores(traj, metric, backend=backend)


def _per_forward(scope: Callable) -> Callable:
    """Wrap a layer scope so that a fused scope's per-forward call counts restart for every micro-batch forward."""
    @contextlib.contextmanager
    def wrapped(position, orig, module):
        with scope(position, orig, module) as calls:
            if isinstance(calls, dict):
                forward = module.forward

                def counting(*args, **kwargs):
                    calls.clear()
                    return forward(*args, **kwargs)

                module.forward = counting
                try:
                    yield
                finally:
                    module.__dict__.pop("forward", None)
            else:
                yield
    return wrapped


# --------------------------------------------------------------------------------------- the oracle of the tests


def _full_logits_loss_sum(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    device = next(model.parameters()).device
    ids, mask = input_ids.to(device), attention_mask.to(device)
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    valid = (mask[:, 1:] * mask[:, :-1]).bool()
    targets = ids[:, 1:].masked_fill(~valid, -100)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).double(), targets.flatten(), ignore_index=-100,
                           reduction="sum")


def reference_layer_scores(model: nn.Module, calibration: Calibration, metric: str = "taylor", *,
                           micro_batch: int = 8) -> torch.Tensor:
    """Naive reference for :func:`layer_scores`: the model's OWN forward (full logits, fp64 cross-entropy), every
    ``.grad`` (or hidden-state gradient) stored, then reduced in fp64.

    For the weight metrics, each micro-batch runs a plain ``backward`` with all weight gradients stored, then every
    stored gradient is reduced. For the hidden-state metrics, the gradient of the loss w.r.t. each layer's output
    hidden state is retained (``retain_grad``) and the formulas of the module docstring are applied to it and to the
    layer's update. Holds every weight gradient at once; for tests and benchmarks.

    Returns:
        fp32 tensor ``[num_layers]`` on CPU.
    """
    check_metric(metric)
    layers = get_adapter(model).layers(model)
    total = int((calibration.attention_mask[:, 1:] * calibration.attention_mask[:, :-1]).sum())
    acc = torch.zeros(len(layers), dtype=torch.float64)
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        if metric not in WEIGHT_METRICS:
            embed = model.get_input_embeddings()
            embed.weight.requires_grad_(True)  # so that the hidden states carry grad through every layer
            for ids, mask in calibration.batches(micro_batch):
                captured = []

                def hook(module, args, kwargs, output):
                    hidden_in = args[0] if args else kwargs["hidden_states"]
                    out = output[0] if isinstance(output, tuple) else output
                    out.retain_grad()
                    captured.append((hidden_in, out))

                handles = [layer.register_forward_hook(hook, with_kwargs=True) for layer in layers]
                try:
                    (_full_logits_loss_sum(model, ids, mask) / total).backward()
                finally:
                    for h in handles:
                        h.remove()
                real = mask.bool().to(captured[0][1].device)
                for i, (hidden_in, out) in enumerate(captured):
                    g = out.grad.double()[real]
                    delta = (out.detach().double() - hidden_in.detach().double())[real]
                    if metric == "gate":
                        acc[i] -= (g * delta).sum()
                    elif metric == "taylor_hidden":
                        acc[i] += (g * delta).abs().sum()
                    else:
                        acc[i] += (g.norm(dim=-1) * delta.norm(dim=-1)).sum()
            embed.weight.grad = None
            return acc.float()
        params = [(i, p) for i, layer in enumerate(layers) for p in layer_matrices(layer)]
        for _, p in params:
            p.requires_grad_(True)
        for ids, mask in calibration.batches(micro_batch):
            (_full_logits_loss_sum(model, ids, mask) / total).backward()
            for i, p in params:  # independent of reduce_gradient: fp64 throughout
                g, w = p.grad.double(), p.detach().double()
                acc[i] += {"grad_l1": g.abs(), "grad_l2": g * g, "taylor": (g * w).abs()}[metric].sum()
                p.grad = None
        return acc.float()
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
            p.grad = None


__all__ = ["BACKENDS", "ScoreStats", "layer_matrices", "layer_scores", "reduce_gradient", "reduce_hidden",
           "reference_layer_scores", "score_layers"]
