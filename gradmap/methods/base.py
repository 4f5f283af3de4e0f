"""What every layer-selection method shares: the record of its decisions and the one-shot rule.

Layers are named by ORIGINAL index (position in the dense model) in everything a method returns. A method runs on
the engine (:class:`gradmap.engine.Engine`): it reads scores or losses from a :class:`~gradmap.engine.Trajectory`
of the calibration set and removes layers from the engine's live view (``engine.remove``); the dense model itself
is never modified.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field


@dataclass
class Step:
    """One pruning decision: every candidate's score, the candidate removed, the cost (seconds).

    Candidates are decoder layers keyed by ORIGINAL index (int) for every method except BlockPruner, whose
    candidates are sub-blocks keyed ``"<layer>.attn"`` / ``"<layer>.mlp"`` (str). One-shot methods repeat the one
    score dict in every step and put the whole scoring time on step 0. ``step`` counts from 1 (the first decision is
    step 1, as in the logs and the plot).
    """

    step: int
    scores: dict[int | str, float]
    removed: int | str
    seconds: float


#: Forward-equivalent passes of one backward: the backward computes gradients w.r.t. activations and weights, ~2x
#: the forward's FLOPs (the usual convention).
BACKWARD_PASSES = 2


@dataclass
class Selection:
    """Outcome of a layer selection (GradMAP or a baseline of :mod:`gradmap.methods`).

    Attributes:
        removed: removed decoder layers, ORIGINAL indices, in removal order.
        steps: every decision (:class:`Step`).
        method: the selection method's name.
        passes: forward-equivalent passes over the calibration set spent on the selection: the engine's parameter-
            token work divided by one forward of the model as it was at each decision (a backward counts 2, a
            resumed forward the share of parameters it runs; :meth:`gradmap.engine.Engine.passes`).
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


def lowest(scores: dict[int, float], count: int, protected: Iterable[int]) -> list[int]:
    """The ``count`` unprotected keys of lowest score, lowest first (ties: the lower original index first).

    Raises:
        ValueError: fewer unprotected layers than ``count`` (named ``protected``).
    """
    protected = {int(p) for p in protected}
    candidates = sorted((s, i) for i, s in scores.items() if i not in protected)
    if len(candidates) < count:
        raise ValueError(f"protected: only {len(candidates)} layers may be removed, fewer than the target {count}")
    return [i for _, i in candidates[:count]]


def one_shot_selection(method: str, scores: dict[int, float], target: int, protected: Iterable[int],
                       seconds: float, passes: float) -> Selection:
    """Turn one-shot layer scores into a :class:`Selection`: the ``target`` lowest-scoring unprotected layers
    (:func:`lowest`). Every step carries the same scores; the scoring time is booked on step 1.

    Raises:
        ValueError: fewer unprotected layers than ``target``.
    """
    victims = lowest(scores, target, protected)
    selection = Selection(method=method, passes=passes)
    for k, victim in enumerate(victims):
        selection.removed.append(victim)
        selection.steps.append(Step(k + 1, dict(scores), victim, seconds if k == 0 else 0.0))
    return selection


def apply_removals(engine, selection: Selection, budget=None) -> Selection:
    """Remove a one-shot selection's layers from the engine's live view in removal order, asking ``budget`` (a
    :class:`gradmap.methods.budget.QualityBudget`) before each; the selection is cut where the budget refuses."""
    for k, victim in enumerate(list(selection.removed)):
        if budget is not None and not budget.allows(engine.view.kept.index(victim)):
            del selection.removed[k:]
            del selection.steps[k:]
            break
        engine.remove(victim)
        if budget is not None:
            budget.removed(victim)
    return selection


def commit_removal(engine, selection: Selection, victim: int, scores: dict[int, float], seconds: float,
                   budget=None) -> bool:
    """End one decision of an iterative method: ask ``budget`` (a :class:`gradmap.methods.budget.QualityBudget`)
    whether ``victim`` (original index) may go; if not, record ``extra["stopped_by_budget"]`` (the decision's seconds
    are reported apart) and return False. Otherwise remove it from the engine's live view, tell the budget, append it
    and its :class:`Step` (``scores`` by original index, ``seconds`` wall time) to ``selection`` and return True."""
    if budget is not None and not budget.allows(engine.view.kept.index(victim)):
        selection.extra["stopped_by_budget"] = {"layer": victim, "seconds": seconds}
        return False
    engine.remove(victim)
    if budget is not None:
        budget.removed(victim)
    selection.removed.append(victim)
    selection.steps.append(Step(len(selection.steps) + 1, scores, victim, seconds))
    return True


def replay(engine, selection: Selection, recorded, budget=None) -> None:
    """Re-apply the decisions of an interrupted run (:class:`Step` list, removal order) without scoring: remove each
    layer from the engine's live view, tell ``budget``, and append the removal and its step to ``selection``."""
    for step in recorded or []:
        engine.remove(step.removed)
        if budget is not None:
            budget.removed(step.removed)
        selection.removed.append(step.removed)
        selection.steps.append(step)


class Timer:
    """``with Timer() as t: ...`` then ``t.seconds`` (wall time, seconds, ``time.perf_counter``)."""

    def __enter__(self):
        self.start = time.perf_counter()
        self.seconds = 0.0
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start
