"""Leave-one-layer-out calibration loss: Shortened LLaMA's PPL criterion (one-shot) and SLEB (iterative).

* Shortened LLaMA, PPL (Kim et al., arXiv 2402.02834, Sec. 3.1): the importance of layer *l* is the calibration
  perplexity of the model with *l* removed, :math:`\\mathrm{PPL}_{-l} = \\exp(\\mathrm{NLL}_{-l})`; the ``n`` layers
  of lowest :math:`\\mathrm{PPL}_{-l}` are removed at once. Cost: L forwards (each resumed from the cached hidden
  state entering layer *l*, :mod:`gradmap.prefix`, about half a pass each on average).
* SLEB (Song et al., arXiv 2402.09025, Sec. 4, Algorithm 1): greedily, remove the layer whose removal from the CURRENT
  model gives the lowest calibration NLL, then re-score the remaining layers; one forward per candidate per decision
  (:math:`\\sum_{k<n} (L-k)` forwards for n removals).

:math:`\\mathrm{NLL}` is the mean next-token cross-entropy over the calibration tokens (nats/token), computed with the
layer really removed (:func:`gradmap.methods.common.layers_left_out`).
"""

from __future__ import annotations

import logging
import math

from torch import nn
from tqdm.auto import tqdm

from ..adapters import get_adapter
from ..data import Calibration
from ..pruning import Selection, Step
from .common import Timer, layers_left_out, one_shot_selection, remove_by_original
from ..prefix import DEFAULT_CACHE_BYTES, PrefixCache, resumed_loss

logger = logging.getLogger(__name__)


def leave_one_out_losses(model: nn.Module, calibration: Calibration, *, candidates: list[int] | None = None,
                         micro_batch: int = 8, progress: bool = False,
                         cache_bytes: int = DEFAULT_CACHE_BYTES) -> tuple[dict[int, float], float]:
    """Calibration NLL (nats/token) of ``model`` with each candidate layer (current position) left out.

    One forward per candidate, each resumed from the cached hidden state entering the candidate's position
    (:mod:`gradmap.prefix`; ``cache_bytes=0`` runs plain full forwards). The model is unchanged afterwards.

    Returns:
        ``({position: nll}, passes)``: the losses and their cost in forward-equivalent passes (cache pass included).
    """
    adapter = get_adapter(model)
    positions = list(range(len(adapter.layers(model))) if candidates is None else candidates)
    cache = PrefixCache(model, calibration, micro_batch=micro_batch, max_bytes=cache_bytes,
                        last=max(positions, default=0), adapter=adapter)
    passes = cache.passes
    losses = {}
    for p in tqdm(positions, desc="leave-one-out", disable=not progress, leave=False):
        with layers_left_out(model, [p], adapter):
            losses[p], cost = resumed_loss(model, calibration, cache, start=p)
        passes += cost
    return losses, passes


def select_ppl(model: nn.Module, calibration: Calibration, target: int, *, protected=(), micro_batch: int = 8,
               kept: list[int] | None = None, progress: bool = False) -> Selection:
    """Shortened LLaMA PPL: remove the ``target`` layers of lowest leave-one-out calibration PPL IN PLACE."""
    kept = list(range(len(get_adapter(model).layers(model)))) if kept is None else list(kept)
    with Timer() as t:
        losses, passes = leave_one_out_losses(model, calibration, micro_batch=micro_batch, progress=progress)
    scores = {kept[p]: math.exp(v) for p, v in losses.items()}
    selection, victims = one_shot_selection("ppl", scores, target, protected, t.seconds, passes=passes)
    remove_by_original(model, victims, kept)
    return selection


def select_sleb(model: nn.Module, calibration: Calibration, target: int, *, protected=(), micro_batch: int = 8,
                kept: list[int] | None = None, progress: bool = False) -> Selection:
    """SLEB: ``target`` greedy decisions, each removing (IN PLACE) the layer whose removal gives the lowest NLL.

    Step scores are the leave-one-out NLLs (nats/token) of the unprotected layers of the current model.

    Raises:
        ValueError: fewer unprotected layers than ``target``.
    """
    kept = list(range(len(get_adapter(model).layers(model)))) if kept is None else list(kept)
    protected = {int(p) for p in protected}
    if len([k for k in kept if k not in protected]) < target:
        raise ValueError(f"protected: fewer unprotected layers than the target {target}")
    selection = Selection(method="sleb")
    for step in range(target):
        with Timer() as t:
            candidates = [p for p, orig in enumerate(kept) if orig not in protected]
            losses, passes = leave_one_out_losses(model, calibration, candidates=candidates,
                                                  micro_batch=micro_batch, progress=progress)
            scores = {kept[p]: v for p, v in losses.items()}
            victim = min(scores, key=lambda k: (scores[k], k))
            kept = remove_by_original(model, [victim], kept)
        selection.passes += passes
        selection.removed.append(victim)
        selection.steps.append(Step(step, scores, victim, t.seconds))
        logger.info("sleb step %d: removed layer %d (NLL %.4f) in %.1f s", step + 1, victim, scores[victim],
                    t.seconds)
    return selection
