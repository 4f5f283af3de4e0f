"""GradMAP's stage-1 schedule: score every layer with one forward + backward, drop the least important, re-score.

Each decision costs one scoring pass over the calibration set (arXiv 2602.14649, Sec. 3, stage 1), resumed: after a
layer at position *p* is removed, the next forward starts from the stored hidden states entering *p* (the engine's
boundaries), so only the layers after it run forward again; the backward always sweeps every layer. Layers are
reported by their ORIGINAL indices (0-based, position in the dense model) throughout.

``verify_top = k > 1`` (our extension, not in the paper): each decision removes, among the ``k`` lowest-scored
unprotected layers, the one whose removal gives the lowest calibration NLL (``k`` resumed forwards, one engine sweep):
the gradient metric shortlists, the loss decides, as SLEB does over all layers. Two knobs make the check cheaper
(also our extension): ``verify_windows`` computes the shortlist's NLL on an evenly spread subset of the calibration
windows only (the same subset at every step, so the candidates are compared on the same tokens), and
``verify_margin`` = m shortlists only the candidates whose score is within a factor ``1 + m`` of the lowest score
(no check at all when the lowest is that far ahead of the runner-up).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

from ..engine import Candidate, Trajectory
from .base import Selection, Step, Timer, commit_removal, replay
from .metrics import layer_scores

logger = logging.getLogger(__name__)


def select_gradmap(traj: Trajectory, target: int, *, metric: str = "grad_update_norm", backend: str = "hooks",
                   protected=(), verify_top: int = 0, verify_windows: int | None = None,
                   verify_margin: float = math.inf, recorded: list[Step] | None = None,
                   on_step: Callable[[Selection], None] | None = None, budget=None) -> Selection:
    """Remove ``target`` layers from the engine's live view, one per scoring pass, lowest score first.

    Args:
        traj: the calibration set's trajectory through the engine's live view.
        target: total number of layers to remove (including ``recorded`` ones).
        metric, backend: see :func:`gradmap.methods.metrics.layer_scores`.
        protected: original indices that are never removed.
        verify_top: shortlist size checked by calibration NLL (0 or 1: off; module docstring).
        verify_windows: calibration windows the check runs on (:func:`verify_subset`: the first windows of
            micro-batches spread evenly over the set); ``None``: all.
        verify_margin: shortlist only candidates with score <= (1 + margin) x the lowest score (default: no limit).
        recorded: decisions of an interrupted run to replay without scoring (:mod:`gradmap.resume`).
        on_step: called with the selection after every new decision (to record it).
        budget: a :class:`gradmap.methods.budget.QualityBudget` asked before every removal (the selection stops at
            the first removal it refuses) and told after it (the removal curve).

    Returns:
        The :class:`Selection` (``extra["verified"]`` holds each decision's shortlist NLLs, nats/token, with
        ``verify_top`` > 1).

    Raises:
        ValueError: ``verify_top`` < 0, ``verify_windows`` < 1, ``verify_margin`` < 0 or NaN, or fewer unprotected
            layers than ``target``.
    """
    if int(verify_top) < 0:
        raise ValueError(f"verify_top: must be >= 0, got {verify_top}")
    if not verify_margin >= 0:
        raise ValueError(f"verify_margin: must be >= 0, got {verify_margin}")
    check_batches, check_rows = verify_subset(traj.windows, verify_windows)
    engine = traj.engine
    protected = {int(p) for p in protected}
    selection = Selection(method="gradmap")
    replay(engine, selection, recorded, budget)
    while len(selection.removed) < target:
        kept = list(engine.view.kept)
        with Timer() as t:
            work0 = engine.work
            scores, stats = layer_scores(traj, metric, backend=backend)
            by_orig = {orig: float(s) for orig, s in zip(kept, scores.tolist())}
            candidates = sorted((s, orig) for orig, s in by_orig.items() if orig not in protected)
            if not candidates:
                raise ValueError(f"protected: no unprotected layer left to reach the target {target}")
            victim = candidates[0][1]
            lowest = candidates[0][0]
            bound = math.inf if math.isinf(verify_margin) else lowest + verify_margin * abs(lowest)
            shortlist = [orig for s, orig in candidates[:verify_top] if s <= bound]
            if verify_top > 1 and len(shortlist) > 1:
                losses = traj.candidate_losses([Candidate(kept.index(o), skip=True, batches=check_batches,
                                                          rows=check_rows)
                                                for o in shortlist], desc="verify")
                nll = {o: total / max(count, 1) for o, (total, count) in zip(shortlist, losses)}
                victim = min(nll, key=lambda o: (nll[o], by_orig[o]))
                selection.extra.setdefault("verified", []).append({str(o): v for o, v in nll.items()})
            elif verify_top > 1:
                selection.extra.setdefault("verified", []).append({})
            selection.passes += traj.passes(engine.work - work0)
        if not commit_removal(engine, selection, victim, by_orig, t.seconds, budget):
            break  # the quality budget stops the selection here
        logger.info("step %d: removed layer %d (score %.4g) in %.1f s", len(selection.steps), victim,
                    by_orig[victim], t.seconds)
        if on_step is not None:
            on_step(selection)
    return selection


def verify_subset(windows, count: int | None) -> tuple[frozenset[int] | None, slice | None]:
    """The calibration windows the loss check runs on: ``(micro-batches, rows)``, i.e. the first ``rows`` windows
    of each of the chosen global micro-batch indices; ``(None, None)`` (every window) when ``count`` is ``None`` or
    covers the whole set.

    The fewest micro-batches that can hold ``count`` windows, ``b = ceil(count / micro_batch)``, spread evenly over
    the set (indices ``floor(i * B / b)`` of the ``B`` micro-batches), and of each the first
    ``ceil(count / b)`` windows (all of them when that is the micro-batch size): ``count`` windows, or slightly
    more when ``count`` does not split evenly. Whole micro-batches are used when ``count`` is a multiple of the
    micro-batch size.

    Raises:
        ValueError: ``count`` is not an int >= 1.
    """
    if count is None:
        return None, None
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"verify_windows: must be a positive number of windows, got {count!r}")
    batches = windows.batches()
    total = windows.input_ids.shape[0]
    if count >= total:
        return None, None
    largest = max(sl.stop - sl.start for _, sl in batches)
    chosen_count = min(len(batches), math.ceil(count / largest))
    per_batch = math.ceil(count / chosen_count)
    chosen = [batches[(i * len(batches)) // chosen_count] for i in range(chosen_count)]
    have = sum(min(per_batch, sl.stop - sl.start) for _, sl in chosen)
    for k, sl in batches:  # uneven micro-batches (a short last one): top up in order
        if have >= count:
            break
        if all(k != c for c, _ in chosen):
            chosen.append((k, sl))
            have += min(per_batch, sl.stop - sl.start)
    rows = None if per_batch >= largest else slice(0, per_batch)
    return frozenset(k for k, _ in chosen), rows
