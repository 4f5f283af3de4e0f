"""Resumed forwards for the leave-one-out searches (PPL, SLEB, BlockPruner, the fidelity oracle) and stage 2's
cross-validation (a fold into layer ``p`` changes nothing before ``p``).

Removing decoder layer ``p`` (or a sub-block of it) leaves the hidden states entering layers ``0..p`` unchanged, so
the calibration loss of every candidate can start from the hidden state entering layer ``p`` instead of re-running
the prefix. :class:`PrefixCache` runs the CURRENT model once over the calibration windows and keeps, per micro-batch,
what decoder layer ``c - 1`` returned (the input of layer ``c``) for a set of checkpoint positions ``c``;
:func:`resumed_loss` then runs the model with layers ``0..c-1`` answering from that cache (their ``forward`` returns
the stored output, no compute), for the largest checkpoint ``c ≤ start``. The layers that do run see the same
inputs as in a full forward, so the loss is the same (tests compare it with the full forward), at a fraction of the
cost.

Nothing family-specific is involved: the layer list, ``layer_idx`` values, per-layer config fields and attention
masks are untouched; only the instance ``forward`` of the prefix layers is replaced for the duration of a forward.

Cost model (for the "forward-equivalent passes" the benchmark reports): a forward costs 2 FLOPs per parameter per
token of the decoder layers it runs plus the LM head (attention-score FLOPs ignored), so a resumed forward counts
``(params of the layers run + head params) / (params of all current layers + head params)`` of a full pass, and the
cache pass (no LM head, stops after the deepest checkpoint's layer) counts its share the same way. This is our
implementation choice for the baselines (the SLEB and BlockPruner papers re-run the full model per candidate); it
makes them faster, never slower, so GradMAP's measured speed-up is not inflated by it.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .adapters import Adapter, get_adapter, model_device
from .data import Calibration
from .scoring import lm_loss_sum

#: Default memory budget of the cached hidden states (bytes, on the model's device).
DEFAULT_CACHE_BYTES = 2 << 30


class StopForward(Exception):
    """Raised by a forward hook to end a forward early (nothing after the hooked module is needed)."""


def forward_until_stop(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> None:
    """One no-grad forward of ``model`` on ``ids``/``mask`` (``[batch, seqlen]``, moved to the model's device), ended
    quietly when a hook raises :class:`StopForward`; hooks read what they need."""
    device = model_device(model)
    try:
        with torch.no_grad():
            model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
    except StopForward:
        pass


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def head_params(model: nn.Module) -> int:
    """Elements of the LM head weight (``get_output_embeddings()``); 0 if the model has none."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return int(head.weight.numel()) if head is not None and getattr(head, "weight", None) is not None else 0


class PrefixCache:
    """Hidden states entering checkpoint layers of the current ``model``, one entry per calibration micro-batch.

    Args:
        model: the model as it will be evaluated (candidates are removed AFTER the cache is built; every checkpoint
            used must lie at or before the first changed layer).
        calibration: the windows the losses are computed on; :func:`resumed_loss` must use the same ``micro_batch``.
        micro_batch: windows per forward.
        max_bytes: memory budget of the cached states (bytes). Checkpoints are every ``stride``-th layer, ``stride``
            the smallest that fits; ``stride`` larger than the layer count means no checkpoint (plain forwards).
        last: deepest position a candidate will start from (default: the last layer); no checkpoint is kept past it.
        positions: exact checkpoints to keep (positions ``1..L-1``; others ignored), instead of the stride rule; the
            memory budget is not applied to them.

    Attributes:
        checkpoints: sorted positions ``c ≥ 1`` with a cached input.
        passes: the cost of building the cache in forward-equivalent passes (module docstring).

    Raises:
        ValueError: ``micro_batch`` < 1 or ``max_bytes`` < 0.
    """

    def __init__(self, model: nn.Module, calibration: Calibration, *, micro_batch: int = 8,
                 max_bytes: int = DEFAULT_CACHE_BYTES, last: int | None = None, adapter: Adapter | None = None,
                 positions: list[int] | None = None):
        if micro_batch < 1:
            raise ValueError(f"micro_batch: must be >= 1, got {micro_batch}")
        if max_bytes < 0:
            raise ValueError(f"max_bytes: must be >= 0, got {max_bytes}")
        self.adapter = adapter or get_adapter(model)
        self.micro_batch = micro_batch
        layers = self.adapter.layers(model)
        n = len(layers)
        last = n - 1 if last is None else min(int(last), n - 1)
        param = next(model.parameters())
        per_checkpoint = calibration.input_ids.numel() * model.config.hidden_size * param.element_size()
        wanted = max(last, 0)  # positions 1..last
        fit = max_bytes // per_checkpoint if per_checkpoint else wanted
        stride = math.ceil(wanted / fit) if fit > 0 else n + 1
        self.checkpoints = list(range(stride, last + 1, stride)) if wanted and stride <= last else []
        if positions is not None:
            self.checkpoints = sorted({int(c) for c in positions if 1 <= int(c) < n})
        self.states: dict[int, list] = {c: [] for c in self.checkpoints}
        self.passes = 0.0
        if not self.checkpoints:
            return
        deepest = self.checkpoints[-1] - 1  # the layer whose output is the deepest cached input
        full = sum(_params(layer) for layer in layers) + head_params(model)
        self.passes = sum(_params(layer) for layer in layers[: deepest + 1]) / full if full else 0.0
        handles = []

        def hook(c):
            def fn(module, args, output):
                out = tuple(o.detach() if torch.is_tensor(o) else o for o in output) if isinstance(output, tuple) \
                    else output.detach()
                self.states[c].append(out)
                if c - 1 == deepest:
                    raise StopForward
            return fn

        for c in self.checkpoints:
            handles.append(layers[c - 1].register_forward_hook(hook(c)))
        try:
            for ids, mask in calibration.batches(micro_batch):
                forward_until_stop(model, ids, mask)
        finally:
            for h in handles:
                h.remove()

    def checkpoint_for(self, start: int) -> int:
        """The largest checkpoint ``c ≤ start`` (0 when none: the forward starts at the embeddings)."""
        best = 0
        for c in self.checkpoints:
            if c <= start:
                best = c
        return best


def resumed_forward_cost(model: nn.Module, checkpoint: int, adapter: Adapter | None = None) -> float:
    """Cost of a forward of ``model`` (as it is now) resumed at ``checkpoint``, in forward-equivalent passes."""
    adapter = adapter or get_adapter(model)
    layers = adapter.layers(model)
    head = head_params(model)
    full = sum(_params(layer) for layer in layers) + head
    run = sum(_params(layer) for layer in layers[checkpoint:]) + head
    return run / full if full else 1.0


def resumed_loss_sum(model: nn.Module, calibration: Calibration, cache: PrefixCache | None, start: int,
                     micro_batch: int = 8) -> tuple[float, int, float]:
    """Summed next-token NLL of ``model`` on ``calibration``, layers before the checkpoint replayed from ``cache``.

    Args:
        model: the model to evaluate; its layers ``0..start-1`` must be those the cache was built with (unchanged).
        cache: from :class:`PrefixCache` on the same calibration windows, or ``None`` (plain forwards).
        start: the first position that differs from the cached model (a removed layer's old position, the layer
            holding a removed sub-block, or the layer a projection was folded into).
        micro_batch: windows per forward when ``cache`` is ``None`` (otherwise the cache's).

    Returns:
        ``(nll_sum, predicted_tokens, passes)``: nats, count, and the forward-equivalent cost of this evaluation.
    """
    adapter = cache.adapter if cache is not None else get_adapter(model)
    micro_batch = cache.micro_batch if cache is not None else micro_batch
    c = cache.checkpoint_for(start) if cache is not None else 0
    layers = adapter.layers(model)
    total, count = 0.0, 0
    with torch.no_grad():
        for b, (ids, mask) in enumerate(calibration.batches(micro_batch)):
            if c:
                stored = cache.states[c][b]
                for layer in layers[:c]:
                    layer.forward = lambda *args, _s=stored, **kwargs: _s
            try:
                loss, n = lm_loss_sum(model, ids, mask)
            finally:
                for layer in layers[:c]:
                    layer.__dict__.pop("forward", None)
            total += float(loss)
            count += n
    return total, count, resumed_forward_cost(model, c, adapter)


def resumed_loss(model: nn.Module, calibration: Calibration, cache: PrefixCache | None, start: int) -> tuple[float, float]:
    """Mean next-token NLL (nats/token) of :func:`resumed_loss_sum`, and its cost in forward-equivalent passes."""
    total, count, cost = resumed_loss_sum(model, calibration, cache, start)
    return total / max(count, 1), cost
