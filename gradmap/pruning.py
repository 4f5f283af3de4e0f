"""Iterative layer selection (GradMAP stage 1 schedule): score, drop the least important layer, re-score.

Each decision costs one forward + one backward over the calibration set (arXiv 2602.14649, Sec. 3, stage 1).
Layers are reported by their ORIGINAL indices (0-based, position in the dense model) throughout.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

from torch import nn

from .adapters import get_adapter
from .data import Calibration
from .removal import remove_layers
from .scoring import layer_scores

logger = logging.getLogger(__name__)


def resolve_target(num_layers_total: int, num_layers: int | None = None, ratio: float | None = None,
                   protected: list[int] | tuple[int, ...] = ()) -> int:
    """Number of decoder layers to remove, from exactly one of ``num_layers`` or ``ratio``.

    ``ratio`` is rounded half up: ``floor(ratio * L + 0.5)`` (30 layers at 0.25 → 8).

    Raises:
        ValueError: if both or neither are given; ``num_layers`` not in [1, L-1]; ``ratio`` not in (0, 1) or rounding
            to 0 or L; a protected index out of range; or too few unprotected layers to reach the target.
    """
    if (num_layers is None) == (ratio is None):
        raise ValueError("give exactly one of num_layers or ratio")
    if ratio is not None:
        if not 0.0 < float(ratio) < 1.0:
            raise ValueError(f"ratio: must be in (0, 1), got {ratio}")
        target = math.floor(float(ratio) * num_layers_total + 0.5)
        if not 1 <= target < num_layers_total:
            raise ValueError(f"ratio: {ratio} of {num_layers_total} layers rounds to {target} layers; "
                             f"need between 1 and {num_layers_total - 1}")
    else:
        target = int(num_layers)
        if not 1 <= target < num_layers_total:
            raise ValueError(f"num_layers: must be between 1 and {num_layers_total - 1} for a model with "
                             f"{num_layers_total} decoder layers, got {num_layers}")
    bad = [p for p in protected if not 0 <= int(p) < num_layers_total]
    if bad:
        raise ValueError(f"protected: indices {bad} out of range [0, {num_layers_total - 1}]")
    free = num_layers_total - len(set(int(p) for p in protected))
    if target > free:
        raise ValueError(f"protected: {num_layers_total - free} protected layers leave {free} removable, "
                         f"fewer than the target {target}")
    return target


@dataclass
class Step:
    """One pruning decision: every candidate's score, the candidate removed, the cost (seconds).

    Candidates are decoder layers keyed by ORIGINAL index (int) for every method except BlockPruner, whose
    candidates are sub-blocks keyed ``"<layer>.attn"`` / ``"<layer>.mlp"`` (str). One-shot methods repeat the one
    score dict in every step and put the whole scoring time on step 0.
    """

    step: int
    scores: dict[int | str, float]
    removed: int | str
    seconds: float


#: Forward-equivalent passes of one GradMAP decision: one forward + one backward, a backward counted as 2 forwards
#: (the usual FLOP convention: the backward computes gradients w.r.t. activations and weights, ~2x the forward).
PASSES_PER_GRADIENT_STEP = 3


@dataclass
class Selection:
    """Outcome of a layer selection (GradMAP or a baseline of :mod:`gradmap.methods`).

    Attributes:
        removed: removed decoder layers, ORIGINAL indices, in removal order.
        steps: every decision (:class:`Step`).
        method: the selection method's name.
        passes: forward-equivalent passes over the calibration set spent on the selection: a forward of the current
            (possibly already pruned) model counts 1, a backward 2 (:data:`PASSES_PER_GRADIENT_STEP`).
        layer_scores: the method's first-step score of every dense decoder layer (original index → score, lower =
            less important), the input of the fidelity check; ``None`` means ``steps[0].scores``.
        extra: method-specific facts for the report (e.g. BlockPruner's zeroed sub-blocks and parameter counts).
    """

    removed: list[int] = field(default_factory=list)
    steps: list[Step] = field(default_factory=list)
    method: str = "gradmap"
    passes: float = 0.0
    layer_scores: dict[int, float] | None = None
    extra: dict = field(default_factory=dict)

    @property
    def seconds(self) -> float:
        """Wall time of all steps, seconds."""
        return sum(s.seconds for s in self.steps)

    def first_layer_scores(self) -> dict[int, float]:
        """Per-layer first-step scores (original index → score) for the fidelity check."""
        if self.layer_scores is not None:
            return dict(self.layer_scores)
        return {int(k): float(v) for k, v in self.steps[0].scores.items()} if self.steps else {}


def select_iterative(model: nn.Module, calibration: Calibration, target: int, *, metric: str = "taylor",
                     protected: list[int] | tuple[int, ...] = (), micro_batch: int = 8, progress: bool = False,
                     kept: list[int] | None = None, selection: Selection | None = None,
                     backend: str = "hooks", verify_top: int = 0) -> Selection:
    """Remove ``target`` layers from ``model`` IN PLACE, one per scoring pass, lowest score first.

    With ``verify_top = k > 0`` (our extension, not in the GradMAP paper), each decision removes, among the ``k``
    lowest-scored unprotected layers, the one whose removal gives the lowest calibration NLL (``k`` forwards resumed
    from cached hidden states, :mod:`gradmap.prefix`): the gradient metric shortlists, the loss decides, as
    SLEB does over all layers. ``k = 1`` is the plain metric (no forward).

    Args:
        model: the working copy to prune (mutated).
        calibration: calibration set for the scores.
        target: total number of layers to remove (including those already in ``selection`` when resuming).
        metric: see :mod:`gradmap.scoring`.
        protected: original indices that are never removed.
        kept: original index of each current layer (defaults to ``range(num_layers)``).
        selection: steps already taken (resuming); its removed layers must already be gone from ``model``.
        backend: weight-gradient reduction backend (see :func:`gradmap.scoring.layer_scores`).
        verify_top: shortlist size checked by calibration NLL (0 or 1: off).

    Returns:
        The :class:`Selection` (removed original indices and per-step scores; with ``verify_top`` > 1,
        ``extra["verified"]`` holds each decision's shortlist NLLs, nats/token, by original index).

    Raises:
        ValueError: ``verify_top`` < 0.
    """
    if int(verify_top) < 0:
        raise ValueError(f"verify_top: must be >= 0, got {verify_top}")
    adapter = get_adapter(model)
    kept = list(range(len(adapter.layers(model)))) if kept is None else list(kept)
    selection = selection or Selection()
    protected = set(int(p) for p in protected)
    while len(selection.removed) < target:
        scores, stats = layer_scores(model, calibration, metric, micro_batch=micro_batch, adapter=adapter,
                                     progress=progress, backend=backend)
        by_orig = {orig: float(s) for orig, s in zip(kept, scores.tolist())}
        candidates = sorted((s, orig) for orig, s in by_orig.items() if orig not in protected)
        _, victim = candidates[0]
        seconds = stats.seconds
        if verify_top > 1:
            t0 = time.perf_counter()
            nll, cost = _verify(model, calibration, [kept.index(o) for _, o in candidates[:verify_top]],
                                micro_batch, adapter)
            nll = {kept[p]: v for p, v in nll.items()}
            victim = min(nll, key=lambda o: (nll[o], by_orig[o]))
            selection.passes += cost
            selection.extra.setdefault("verified", []).append({str(o): v for o, v in nll.items()})
            seconds += time.perf_counter() - t0
        position = kept.index(victim)
        remove_layers(model, [position], adapter)
        kept.pop(position)
        selection.removed.append(victim)
        selection.steps.append(Step(len(selection.steps), by_orig, victim, seconds))
        selection.passes += PASSES_PER_GRADIENT_STEP
        logger.info("step %d: removed layer %d (score %.4g) in %.1f s", len(selection.steps), victim,
                    by_orig[victim], stats.seconds)
    return selection


def _verify(model: nn.Module, calibration: Calibration, positions: list[int], micro_batch: int, adapter
            ) -> tuple[dict[int, float], float]:
    """Calibration NLL with each of ``positions`` left out, and the cost in forward-equivalent passes."""
    from .methods.ppl import leave_one_out_losses  # the methods package imports this module

    return leave_one_out_losses(model, calibration, candidates=positions, micro_batch=micro_batch)
