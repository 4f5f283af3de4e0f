"""Layer-selection methods behind one call: GradMAP and the baselines it is compared with, all on the engine.

=================  =====================================================  ==========  ==============================
method             score (lower = removed first)                          schedule    cost per decision
=================  =====================================================  ==========  ==============================
``gradmap``        gradient metric (:mod:`.metrics`, :mod:`.gradmap`)      iterative   1 resumed forward + 1 backward
``shortgpt``       Block Influence (:mod:`.shortgpt`)                     one-shot    1 forward in all
``gromov``         angular distance of a contiguous block (:mod:`.gromov`) one-shot   1 forward in all
``taylor-plus``    Σ|W ⊙ ∂L/∂W|, first 4 / last 2 kept (:mod:`.taylor_plus`) one-shot 1 forward + 1 backward
``ppl``            leave-one-out calibration PPL (:mod:`.ppl`)            one-shot    L resumed forwards in all
``sleb``           leave-one-out calibration NLL, re-scored (:mod:`.ppl`) iterative   (L - k) resumed forwards
``blockpruner``    leave-one-sub-block-out PPL (:mod:`.blockpruner`)      iterative   one resumed forward per sub-block
=================  =====================================================  ==========  ==============================

Every method reads the calibration set's :class:`~gradmap.engine.Trajectory` and removes layers from the engine's
live view; the passes they report are the engine's measured work in forward-equivalent passes (a backward counts 2,
a resumed forward the share of parameters it runs). Compensation (:mod:`gradmap.compensation`) applies on top of any
method.
"""

from __future__ import annotations

import math

from ..engine import Trajectory
from ..names import METHODS, check_method
from .base import Selection, Step
from .blockpruner import select_blockpruner
from .gradmap import select_gradmap
from .gromov import select_gromov
from .ppl import select_ppl, select_sleb
from .shortgpt import select_shortgpt
from .taylor_plus import select_taylor_plus


def select_layers(traj: Trajectory, target: int, *, method: str = "gradmap", metric: str = "grad_update_norm",
                  protected=(), backend: str = "hooks", verify_top: int = 0, verify_windows: int | None = None,
                  verify_margin: float = math.inf, verify_extend: bool = False, recorded: list[Step] | None = None,
                  on_step=None, budget=None) -> Selection:
    """Select and remove ``target`` decoder layers from the engine's (dense) live view with ``method``.

    Args:
        traj: the calibration set's trajectory through the engine's live view.
        target: layers to remove (BlockPruner: the parameters of ``target`` layers, see :mod:`.blockpruner`).
        metric, backend, verify_top, verify_windows, verify_margin, verify_extend: GradMAP's options
            (:func:`.gradmap.select_gradmap`); the other methods ignore them (the API refuses them for baselines).
        recorded, on_step: decisions to replay and a callback after each new decision (GradMAP and SLEB; the other
            methods ignore them).
        protected: original indices never removed.
        budget: :class:`gradmap.methods.budget.QualityBudget` (removal curve; with a limit, the stop rule). Every
            method but BlockPruner stops at the first removal it refuses; BlockPruner only records the curve.

    Returns:
        :class:`Selection` with ``method`` and ``passes`` filled in.

    Raises:
        ValueError: unknown method, or what the method raises (too many protected layers, unsupported family).
    """
    check_method(method)
    if method == "gradmap":
        return select_gradmap(traj, target, metric=metric, backend=backend, protected=protected,
                              verify_top=verify_top, verify_windows=verify_windows, verify_margin=verify_margin,
                              verify_extend=verify_extend,
                              recorded=recorded, on_step=on_step, budget=budget)
    if method == "shortgpt":
        return select_shortgpt(traj, target, protected=protected, budget=budget)
    if method == "gromov":
        return select_gromov(traj, target, protected=protected, budget=budget)
    if method == "taylor-plus":
        return select_taylor_plus(traj, target, protected=protected, backend=backend, budget=budget)
    if method == "ppl":
        return select_ppl(traj, target, protected=protected, budget=budget)
    if method == "sleb":
        return select_sleb(traj, target, protected=protected, budget=budget, recorded=recorded, on_step=on_step)
    return select_blockpruner(traj, target, protected=protected, budget=budget)


__all__ = ["METHODS", "Selection", "Step", "select_layers"]
