"""Leave-one-layer-out calibration loss: Shortened LLaMA's PPL criterion (one-shot) and SLEB (iterative).

* Shortened LLaMA, PPL (Kim et al., arXiv 2402.02834, Sec. 3.1): the importance of layer *l* is the calibration
  perplexity of the model with *l* removed, :math:`\\mathrm{PPL}_{-l} = \\exp(\\mathrm{NLL}_{-l})`; the ``n`` layers
  of lowest :math:`\\mathrm{PPL}_{-l}` are removed at once.
* SLEB (Song et al., arXiv 2402.09025, Sec. 4, Algorithm 1): greedily, remove the layer whose removal from the CURRENT
  model gives the lowest calibration NLL, then re-score the remaining layers; one forward per candidate per decision.

:math:`\\mathrm{NLL}` is the mean next-token cross-entropy over the calibration tokens (nats/token). Every candidate's
forward resumes from the engine's stored hidden states entering its layer (:meth:`gradmap.engine.Trajectory.
candidate_losses`): the loss is the same as a full forward, at a fraction of the cost (the papers re-run the whole
model per candidate; this makes the baselines faster, never slower, so GradMAP's measured speed-up is not inflated).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

from ..engine import Candidate, Trajectory
from .base import (
    Selection,
    Step,
    Timer,
    apply_removals,
    commit_removal,
    one_shot_selection,
    replay,
)

logger = logging.getLogger(__name__)


def leave_one_out_losses(traj: Trajectory, positions: list[int] | None = None) -> dict[int, float]:
    """Calibration NLL (nats/token, all ranks) of the trajectory's view with each position in ``positions``
    (default: all) left out; the view is unchanged afterwards.

    Returns:
        ``{position: nll}``.
    """
    positions = list(range(traj.n)) if positions is None else list(positions)
    losses = traj.candidate_losses([Candidate(p, skip=True) for p in positions], desc="leave-one-out")
    return {p: total / max(count, 1) for p, (total, count) in zip(positions, losses)}


def select_ppl(traj: Trajectory, target: int, *, protected=(), budget=None) -> Selection:
    """Shortened LLaMA PPL: remove the ``target`` layers of lowest leave-one-out calibration PPL from the live view."""
    engine = traj.engine
    kept = list(engine.view.kept)
    work0 = engine.work
    with Timer() as t:
        losses = leave_one_out_losses(traj)
    scores = {kept[p]: math.exp(v) for p, v in losses.items()}
    selection = one_shot_selection("ppl", scores, target, protected, t.seconds, passes=traj.passes(engine.work - work0))
    return apply_removals(engine, selection, budget)


def select_sleb(traj: Trajectory, target: int, *, protected=(), budget=None, recorded: list[Step] | None = None,
                on_step: Callable[[Selection], None] | None = None) -> Selection:
    """SLEB: ``target`` greedy decisions, each removing from the live view the layer whose removal gives the lowest
    calibration NLL. Step scores are the leave-one-out NLLs (nats/token) of the unprotected layers.

    ``recorded``: decisions of an interrupted run, replayed without scoring (each is a deterministic function of the
    calibration windows and the decisions before it); ``on_step(selection)`` is called after every new decision (to
    record it). A long search can so be split over several runs.

    Raises:
        ValueError: fewer unprotected layers than ``target``.
    """
    engine = traj.engine
    protected = {int(p) for p in protected}
    if len([k for k in engine.view.kept if k not in protected]) < target:
        raise ValueError(f"protected: fewer unprotected layers than the target {target}")
    selection = Selection(method="sleb")
    replay(engine, selection, recorded, budget)
    for step in range(len(selection.removed), target):
        kept = list(engine.view.kept)
        with Timer() as t:
            work0 = engine.work
            candidates = [p for p, orig in enumerate(kept) if orig not in protected]
            losses = leave_one_out_losses(traj, candidates)
            scores = {kept[p]: v for p, v in losses.items()}
            victim = min(scores, key=lambda k: (scores[k], k))
            selection.passes += traj.passes(engine.work - work0)
        if not commit_removal(engine, selection, victim, scores, t.seconds, budget):
            break  # the quality budget stops the selection here
        logger.info("sleb step %d: removed layer %d (NLL %.4f) in %.1f s", step + 1, victim, scores[victim],
                    t.seconds)
        if on_step is not None:
            on_step(selection)
    return selection
