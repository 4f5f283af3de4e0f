"""Shortened LLaMA Taylor+ (Kim et al., arXiv 2402.02834, Sec. 3.1, Eq. 2 and "Taylor+"), one-shot, one backward.

:math:`I_l = \\sum_{W \\in l} \\sum_{ij} |W_{ij}\\,\\partial L/\\partial W_{ij}|` over the layer's weight matrices,
from one forward + backward of the LM loss on the calibration set (:func:`gradmap.methods.metrics.layer_scores` with
``metric="taylor"``). The "+" variant never removes the first 4 and the last 2 decoder layers (their heuristic, since
those layers carry outsized importance). Lowest ``I_l`` removed first.
"""

from __future__ import annotations

from ..engine import Trajectory
from .base import Selection, apply_removals, one_shot_selection
from .metrics import layer_scores

KEEP_FIRST = 4
KEEP_LAST = 2


def taylor_plus_protected(num_layers: int) -> list[int]:
    """Original indices Taylor+ never removes: the first :data:`KEEP_FIRST` and last :data:`KEEP_LAST` layers."""
    return sorted(set(range(min(KEEP_FIRST, num_layers))) | set(range(max(num_layers - KEEP_LAST, 0), num_layers)))


def select_taylor_plus(traj: Trajectory, target: int, *, protected=(), backend: str = "hooks",
                       budget=None) -> Selection:
    """Remove the ``target`` lowest-Taylor layers outside the first 4 / last 2 (and ``protected``) from the live view.

    The engine's view must be the dense model (the first/last rule refers to its layer count).

    Raises:
        ValueError: fewer than ``target`` layers left once the first 4, last 2 and ``protected`` are excluded.
    """
    engine = traj.engine
    n = engine.n_layers
    kept = list(engine.view.kept)
    guard = set(taylor_plus_protected(n)) | {int(p) for p in protected}
    if n - len(guard) < target:
        raise ValueError(f"method: taylor-plus keeps the first {KEEP_FIRST} and last {KEEP_LAST} of the {n} layers "
                         f"(and protected {sorted(int(p) for p in protected)}): {n - len(guard)} removable, "
                         f"fewer than the target {target}")
    work0 = engine.work
    scores, stats = layer_scores(traj, "taylor", backend=backend)
    by_orig = {orig: float(s) for orig, s in zip(kept, scores.tolist())}
    selection = one_shot_selection("taylor-plus", by_orig, target, guard, stats.seconds,
                                   passes=traj.passes(engine.work - work0))
    selection.extra["protected"] = sorted(guard)
    return apply_removals(engine, selection, budget)
