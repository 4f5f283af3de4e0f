"""Stage 1 of GradMAP: score every decoder layer at once from one forward + one backward of the LM loss.

GradMAP (Li et al., arXiv 2602.14649, Sec. 3, stage 1) ranks layers globally by the magnitude of the LM-loss gradient
of their parameters, from a single backward pass. The variants implemented here (``METRICS``):

* ``grad_l1``: :math:`S_l = \\sum_{W \\in l} \\sum_{ij} |\\partial L/\\partial W_{ij}|`
* ``grad_l2``: :math:`S_l = \\sum_{W \\in l} \\sum_{ij} (\\partial L/\\partial W_{ij})^2`
* ``taylor``: :math:`S_l = \\sum_{W \\in l} \\sum_{ij} |W_{ij}\\,\\partial L/\\partial W_{ij}|`, the first-order Taylor
  importance of Shortened LLaMA (Kim et al., arXiv 2402.02834, Sec. 3.1, Eq. 2).
* ``gate``: a scalar gate :math:`\\alpha_l` multiplies layer *l*'s residual branch,
  :math:`h_{l+1} = h_l + \\alpha_l (f_l(h_l) - h_l)`, evaluated at :math:`\\alpha_l = 1`; the score
  :math:`S_l = -\\partial L/\\partial\\alpha_l` is the first-order estimate of the loss increase when the layer is
  removed (:math:`\\alpha_l: 1 \\to 0`). It needs no weight gradients at all.

* ``taylor_hidden``: first-order Taylor importance of the layer's residual-branch output, element-wise:
  :math:`S_l = \sum_t \sum_d |g_{l,t,d}\,\Delta_{l,t,d}|` with :math:`g_{l,t} = \partial L/\partial h_{l+1,t}`
  (gradient w.r.t. the layer's output hidden state at token *t*) and :math:`\Delta_{l,t} = h_{l+1,t} - h_{l,t}`
  (what the layer adds to the residual stream).
* ``grad_update_norm``: :math:`S_l = \sum_t \|g_{l,t}\|_2\,\|\Delta_{l,t}\|_2`, the Cauchy-Schwarz bound of the
  per-token first-order loss change :math:`|\langle g_{l,t}, \Delta_{l,t}\rangle|` when the layer is removed: the
  magnitude of the loss gradient at the layer's output, weighted by the size of the layer's update. Like ``gate`` it
  needs no weight gradients (only activation gradients flow).

The hidden-state metrics (``gate``, ``taylor_hidden``, ``grad_update_norm``) are gradient-magnitude metrics taken at
the layer's output instead of its parameters; the choice of the default is measured in ``docs/metric_selection.md``.

``W`` ranges over the 2-D weight matrices of the decoder layer (q/k/v/o projections, gate/up/down projections; biases
and norm weights are not scored). Lower score = less important = removed first.

Memory: weight gradients are never all held at once. Only the decoder layers' matrices require grad; each one gets a
post-accumulate-grad hook that reduces its gradient into the layer's fp32 score as soon as autograd has produced it and
then frees it (``p.grad = None``), so at most one weight gradient exists at a time.

Micro-batches: the loss of the calibration set is the mean token cross-entropy over all real (unpadded) predicted
tokens. Micro-batch *b* contributes :math:`L_b = \\sum_{t \\in b} \\mathrm{CE}_t / N_{\\text{tokens}}`, so
:math:`L = \\sum_b L_b`. The reductions are taken per micro-batch and summed: :math:`S_l = \\sum_b S_l(\\nabla L_b)`.
With one micro-batch (``micro_batch >= nsamples``) this is exactly the full-batch metric; ``gate`` is linear in the
gradient and is exact for any micro-batch size. :func:`reference_layer_scores` computes the same quantities the naive
way (stored ``.grad``, then reduce) and is what the tests compare against.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .adapters import Adapter, get_adapter, model_device
from .data import Calibration

WEIGHT_METRICS = ("grad_l1", "grad_l2", "taylor")
HIDDEN_METRICS = ("taylor_hidden", "grad_update_norm")
METRICS = WEIGHT_METRICS + ("gate",) + HIDDEN_METRICS


def check_metric(metric: str) -> str:
    """Return ``metric`` if it is one of :data:`METRICS`.

    Raises:
        ValueError: naming the accepted values.
    """
    if metric not in METRICS:
        raise ValueError(f"metric: {metric!r} is not one of {', '.join(METRICS)}")
    return metric


def lm_loss_sum(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over real tokens of one batch.

    Position *t* predicts token *t+1*; it counts when both tokens are real (``attention_mask == 1``).

    Args:
        input_ids: LongTensor ``[batch, seqlen]``.
        attention_mask: LongTensor ``[batch, seqlen]``.

    Returns:
        ``(loss_sum, num_targets)``: fp32 scalar tensor (nats) and the number of predicted tokens.
    """
    device = model_device(model)
    input_ids = input_ids.to(device)
    attention_mask = attention_mask.to(device)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    valid = (attention_mask[:, 1:] * attention_mask[:, :-1]).bool()
    # Shift the targets, not the logits: slicing logits[:, :-1] would copy the whole [batch, seqlen, vocab] tensor.
    targets = F.pad(input_ids[:, 1:].masked_fill(~valid, -100), (0, 1), value=-100)
    loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100, reduction="sum")
    return loss, int(valid.sum())


def num_targets(calibration: Calibration) -> int:
    """Number of predicted tokens (both positions real) in ``calibration``."""
    m = calibration.attention_mask
    return int((m[:, 1:] * m[:, :-1]).sum())


def layer_matrices(layer: nn.Module) -> list[nn.Parameter]:
    """The 2-D weight matrices of one decoder layer, the parameters GradMAP scores."""
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
    raise ValueError(f"metric: {metric!r} has no weight-gradient reduction; accepted: grad_l1, grad_l2, taylor")


@contextlib.contextmanager
def _only_grad(model: nn.Module, params: list[nn.Parameter]):
    """Temporarily make ``params`` the only parameters that require grad; restore the flags afterwards."""
    saved = [(p, p.requires_grad) for p in model.parameters()]
    keep = {id(p) for p in params}
    try:
        for p in model.parameters():
            p.requires_grad_(id(p) in keep)
            p.grad = None
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)
            p.grad = None


@contextlib.contextmanager
def _residual_gates(layers: nn.ModuleList, gates: torch.Tensor):
    """Scale each decoder layer's residual branch by ``gates[l]``: ``h_out = h_in + gates[l] * (f(h_in) - h_in)``."""

    def make_hook(i):
        def hook(module, args, kwargs, output):
            hidden_in = args[0] if args else kwargs["hidden_states"]
            out = output[0] if isinstance(output, tuple) else output
            gated = hidden_in + gates[i].to(out.dtype) * (out - hidden_in)
            return (gated, *output[1:]) if isinstance(output, tuple) else gated
        return hook

    handles = [layer.register_forward_hook(make_hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def reduce_hidden(metric: str, grad: torch.Tensor, delta: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Reduce one layer's output gradient ``g`` and update ``Δ`` to its score contribution, in fp32.

    Args:
        metric: ``taylor_hidden`` (Σ_t Σ_d |g Δ|) or ``grad_update_norm`` (Σ_t ‖g_t‖ ‖Δ_t‖).
        grad, delta: ``[batch, seqlen, hidden]``.
        mask: ``[batch, seqlen]`` attention mask; padding tokens contribute nothing.

    Returns:
        fp32 scalar.
    """
    g, d = grad.float(), delta.float()
    m = mask.to(device=g.device, dtype=torch.float32)
    if metric == "taylor_hidden":
        return ((g * d).abs().sum(-1) * m).sum()
    if metric == "grad_update_norm":
        return (g.norm(dim=-1) * d.norm(dim=-1) * m).sum()
    raise ValueError(f"metric: {metric!r} is not a hidden-state metric; accepted: {', '.join(HIDDEN_METRICS)}")


@contextlib.contextmanager
def _hidden_reductions(model: nn.Module, layers: nn.ModuleList, metric: str, acc: torch.Tensor, mask_ref: list):
    """Make the hidden states carry grad (embedding output as a leaf) and, for every decoder layer, reduce
    ``∂L/∂h_out`` against the layer's update ``h_out - h_in`` as soon as the gradient is produced."""

    def make_hook(i):
        def hook(module, args, kwargs, output):
            hidden_in = args[0] if args else kwargs["hidden_states"]
            out = output[0] if isinstance(output, tuple) else output
            if out.requires_grad:
                delta = (out - hidden_in).detach()
                out.register_hook(lambda g: acc.__setitem__(i, acc[i] + reduce_hidden(metric, g, delta, mask_ref[0])))
        return hook

    embed = model.get_input_embeddings()
    handles = [embed.register_forward_hook(lambda m, a, o: o.detach().requires_grad_())]
    handles += [layer.register_forward_hook(make_hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@dataclass
class ScoreStats:
    """What one scoring pass cost: wall time (seconds), micro-batches, tokens, forward+backward passes."""

    seconds: float
    micro_batches: int
    tokens: int
    passes: int = 1


BACKENDS = ("hooks", "fused")


def layer_scores(model: nn.Module, calibration: Calibration, metric: str = "taylor", *, micro_batch: int = 8,
                 adapter: Adapter | None = None, progress: bool = False,
                 backend: str = "hooks") -> tuple[torch.Tensor, ScoreStats]:
    """Score every decoder layer of ``model`` with one forward + backward over ``calibration`` (GradMAP stage 1).

    The model's parameters are left exactly as they were (``requires_grad`` flags restored, no ``.grad`` kept).

    Args:
        model: ``*ForCausalLM`` supported by :mod:`gradmap.adapters`, in eval mode.
        calibration: the calibration set.
        metric: one of :data:`METRICS` (formulas in the module docstring).
        micro_batch: windows per forward/backward; the scores are summed over micro-batches.
        backend: for the weight metrics, ``"hooks"`` (autograd forms each dW, a post-accumulate-grad hook reduces
            and frees it) or ``"fused"`` (:mod:`gradmap.kernels`: the reduction is fused into the linear layers'
            backward, no dW is ever stored; Triton on CUDA). The hidden-state metrics ignore it.

    Returns:
        ``(scores, stats)``: fp32 tensor ``[num_layers]`` on CPU (position *i* = current layer *i*), and the cost.

    Raises:
        ValueError: unknown metric, or a non-finite score (fp16 overflow: rerun in bfloat16/float32).
    """
    check_metric(metric)
    if backend not in BACKENDS:
        raise ValueError(f"backend: {backend!r} is not one of {', '.join(BACKENDS)}")
    adapter = adapter or get_adapter(model)
    if backend == "fused" and metric in WEIGHT_METRICS:
        from .kernels.fused_scoring import fused_layer_scores

        return fused_layer_scores(model, calibration, metric, micro_batch=micro_batch, adapter=adapter,
                                  progress=progress)
    layers = adapter.layers(model)
    device = model_device(model)
    total = num_targets(calibration)
    start = time.perf_counter()
    n_batches = 0
    batches = list(calibration.batches(micro_batch))
    if metric == "gate":
        gates = torch.ones(len(layers), dtype=torch.float32, device=device, requires_grad=True)
        with _only_grad(model, []), _residual_gates(layers, gates):
            for ids, mask in tqdm(batches, desc="scoring (gate)", disable=not progress, leave=False):
                loss, _ = lm_loss_sum(model, ids, mask)
                (loss / total).backward()
                n_batches += 1
        scores = -gates.grad.detach().float().cpu()
    elif metric in HIDDEN_METRICS:
        acc = torch.zeros(len(layers), dtype=torch.float32, device=device)
        mask_ref: list = [None]
        with _only_grad(model, []), _hidden_reductions(model, layers, metric, acc, mask_ref):
            for ids, mask in tqdm(batches, desc=f"scoring ({metric})", disable=not progress, leave=False):
                mask_ref[0] = mask
                loss, _ = lm_loss_sum(model, ids, mask)
                (loss / total).backward()
                n_batches += 1
        scores = acc.cpu()
    else:
        acc = torch.zeros(len(layers), dtype=torch.float32, device=device)
        params = []
        handles = []
        for i, layer in enumerate(layers):
            for p in layer_matrices(layer):
                params.append(p)

                def hook(param, i=i):
                    acc[i] += reduce_gradient(metric, param.grad, param.detach())
                    param.grad = None

                handles.append(p.register_post_accumulate_grad_hook(hook))
        try:
            with _only_grad(model, params):
                for ids, mask in tqdm(batches, desc=f"scoring ({metric})", disable=not progress, leave=False):
                    loss, _ = lm_loss_sum(model, ids, mask)
                    (loss / total).backward()
                    n_batches += 1
        finally:
            for h in handles:
                h.remove()
        scores = acc.cpu()
    if not torch.isfinite(scores).all():
        raise ValueError(f"non-finite layer scores ({metric}): the gradients overflowed; "
                         "use dtype bfloat16 or float32 instead of float16")
    return scores, ScoreStats(time.perf_counter() - start, n_batches, calibration.num_tokens)


def reference_layer_scores(model: nn.Module, calibration: Calibration, metric: str = "taylor", *,
                           micro_batch: int = 8) -> torch.Tensor:
    """Naive reference for :func:`layer_scores`: store every ``.grad`` (or the hidden-state gradients), then reduce.

    For the weight metrics, each micro-batch runs a plain ``backward`` with all weight gradients stored, then every
    stored gradient is reduced. For the hidden-state metrics, the gradient of the loss w.r.t. each layer's output
    hidden state is retained (``retain_grad``) and the formulas of the module docstring are applied to it and to the
    layer's update, e.g. :math:`-\\partial L/\\partial \\alpha_l = -\\sum_t \\langle \\partial L/\\partial h_{l+1},
    f_l(h_l) - h_l \\rangle` for ``gate``. Used by the tests and benchmarks; holds every weight gradient at once.

    Returns:
        fp32 tensor ``[num_layers]`` on CPU.
    """
    check_metric(metric)
    adapter = get_adapter(model)
    layers = adapter.layers(model)
    total = num_targets(calibration)
    acc = torch.zeros(len(layers), dtype=torch.float64)
    if metric == "gate" or metric in HIDDEN_METRICS:
        for ids, mask in calibration.batches(micro_batch):
            captured = []

            def hook(module, args, kwargs, output):
                hidden_in = args[0] if args else kwargs["hidden_states"]
                out = output[0] if isinstance(output, tuple) else output
                out.retain_grad()
                captured.append((hidden_in, out))

            handles = [layer.register_forward_hook(hook, with_kwargs=True) for layer in layers]
            try:
                with _only_grad(model, []):
                    embed = model.get_input_embeddings()
                    embed.weight.requires_grad_(True)  # so that hidden states carry grad through every layer
                    loss, _ = lm_loss_sum(model, ids, mask)
                    (loss / total).backward()
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
            finally:
                for h in handles:
                    h.remove()
        return acc.float()
    params = [(i, p) for i, layer in enumerate(layers) for p in layer_matrices(layer)]
    with _only_grad(model, [p for _, p in params]):
        for ids, mask in calibration.batches(micro_batch):
            loss, _ = lm_loss_sum(model, ids, mask)
            (loss / total).backward()
            for i, p in params:  # independent of reduce_gradient: fp64 throughout
                g, w = p.grad.double(), p.detach().double()
                acc[i] += {"grad_l1": g.abs(), "grad_l2": g * g, "taylor": (g * w).abs()}[metric].sum()
                p.grad = None
    return acc.float()
