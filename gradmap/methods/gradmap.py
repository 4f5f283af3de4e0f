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
(no check at all when the lowest is that far ahead of the runner-up). ``verify_extend`` (also ours) widens the
shortlist where the metric's ranking is evidently off: when the lowest NLL belongs to the shortlist's LAST
(highest-scored) layer, the next ``verify_top`` layers by score are checked too, and so on while the winner stays at
the end (the rule the stage-2 ridge grid follows at its ends); where the metric ranks well it costs nothing extra.
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
                   verify_margin: float = math.inf, verify_extend: bool = False, recorded: list[Step] | None = None,
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
        verify_extend: while the lowest NLL is the shortlist's last (highest-scored) layer, check the next
            ``verify_top`` layers by score too (module docstring; measured not to pay, docs/metric_selection.md).
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
                nll: dict[int, float] = {}
                batch = shortlist
                while batch:
                    losses = traj.candidate_losses([Candidate(kept.index(o), skip=True, batches=check_batches,
                                                              rows=check_rows)
                                                    for o in batch], desc="verify")
                    nll.update({o: total / max(count, 1) for o, (total, count) in zip(batch, losses)})
                    victim = min(nll, key=lambda o: (nll[o], by_orig[o]))
                    if not verify_extend or victim != shortlist[-1]:
                        break  # the best lies inside the checked range: the ranking beyond it is not in doubt
                    batch = [orig for s, orig in candidates[len(shortlist):len(shortlist) + verify_top] if s <= bound]
                    shortlist = shortlist + batch
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


DEFAULT_VERIFY_TOP = 3
"""Shortlist size of the default loss check: the 3 lowest-scored layers. Measured against a third of the layers (10
of SmolLM2's 30, 6 of Gemma-3-270M's 18), which follows the loss-greedy search (SLEB) more closely and lost on test
PPL on both models (docs/metric_selection.md)."""


def default_verify_top(num_layers: int) -> int:
    """Shortlist size of the default loss check for a model of ``num_layers`` decoder layers:
    ``min(DEFAULT_VERIFY_TOP, num_layers)`` (:data:`DEFAULT_VERIFY_TOP` = 3), and 0 (no check: the metric alone) for a
    one-layer model, where there is nothing to compare.

    Raises:
        ValueError: ``num_layers`` < 1.
    """
    if num_layers < 1:
        raise ValueError(f"default_verify_top: need num_layers >= 1, got {num_layers}")
    return min(DEFAULT_VERIFY_TOP, num_layers) if num_layers >= 2 else 0


VERIFY_FRACTION = 8
"""The default check runs on 1/VERIFY_FRACTION of the calibration windows (its cost a fixed share of a scoring step's
at any calibration size) ..."""
VERIFY_MIN_TOKENS = 1024
"""... and on at least this many tokens (all windows when the set is smaller): the smallest check measured to take
the same decisions as a check on twice the tokens (docs/metric_selection.md)."""


def default_verify_windows(nsamples: int, seqlen: int) -> int:
    """Windows the default loss check runs on: ``min(nsamples, max(ceil(nsamples / 8), ceil(1024 / seqlen)))``
    (:data:`VERIFY_FRACTION`, :data:`VERIFY_MIN_TOKENS`): 4 of 32×256 or of 16×256 windows, all of 8×64.

    Raises:
        ValueError: ``nsamples`` or ``seqlen`` < 1.
    """
    if nsamples < 1 or seqlen < 1:
        raise ValueError(f"default_verify_windows: need nsamples >= 1 and seqlen >= 1, got {nsamples}, {seqlen}")
    return min(nsamples, max(math.ceil(nsamples / VERIFY_FRACTION), math.ceil(VERIFY_MIN_TOKENS / seqlen)))


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
