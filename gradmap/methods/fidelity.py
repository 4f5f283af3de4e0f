"""Metric fidelity: how well each method's first-step layer scores rank the true cost of removing each layer.

Oracle: the increase of the mean next-token NLL (nats/token) when one decoder layer is removed from the dense model,
:math:`\\Delta_l = \\mathrm{NLL}_{-l} - \\mathrm{NLL}`, on a set of token windows (L + 1 forwards). Fidelity of a
method: the Spearman rank correlation between its first-step scores (lower = less important) and :math:`\\Delta_l`
over the layers both rank (Spearman 1904; :func:`scipy.stats.spearmanr` when scipy is installed, otherwise the same
statistic computed here: Pearson correlation of average ranks, ties sharing their mean rank). +1 = same order as the
oracle.

Note: Shortened-LLaMA PPL and SLEB's first step score exactly :math:`\\mathrm{NLL}_{-l}` (or its exp); on the oracle's
own windows they would correlate 1 by construction, so the oracle should be run on windows no method selected with.
"""

from __future__ import annotations

import math

import torch

from ..engine import Trajectory
from .base import Timer
from .ppl import leave_one_out_losses


def oracle_loss_increase(traj: Trajectory) -> dict:
    """Loss increase of removing each single decoder layer of the trajectory's view (module docstring): one forward
    and L leave-one-out forwards resumed from the stored hidden states.

    Returns:
        ``{"dense_nll": float, "increase": {original layer: float}, "seconds": float, "passes": float}``
        (nats/token, seconds, forward-equivalent passes).
    """
    engine = traj.engine
    work0 = engine.work
    with Timer() as t:
        total, count = traj.loss()
        base = total / max(count, 1)
        losses = leave_one_out_losses(traj)
    kept = traj.view.kept
    return {"dense_nll": base, "increase": {kept[p]: v - base for p, v in losses.items()}, "seconds": t.seconds,
            "passes": traj.passes(engine.work - work0)}


def _average_ranks(values: list[float]) -> list[float]:
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return ranks


def spearman_fallback(x: list[float], y: list[float]) -> float:
    """Spearman's rho without scipy: Pearson correlation of average ranks (ties share their mean rank).

    Returns NaN when either side is constant.
    """
    rx, ry = torch.tensor(_average_ranks(x), dtype=torch.float64), torch.tensor(_average_ranks(y), dtype=torch.float64)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = float(rx.norm() * ry.norm())
    return float((rx * ry).sum()) / denom if denom > 0 else math.nan


def spearman(scores: dict, oracle: dict) -> float:
    """Spearman rank correlation of ``scores`` and ``oracle`` over their common keys (layer indices).

    Raises:
        ValueError: fewer than 3 common layers.
    """
    common = sorted(set(scores) & set(oracle))
    if len(common) < 3:
        raise ValueError(f"scores: need at least 3 layers in common with the oracle, got {len(common)}")
    x = [float(scores[k]) for k in common]
    y = [float(oracle[k]) for k in common]
    try:
        from scipy.stats import spearmanr
    except ImportError:
        return spearman_fallback(x, y)
    return float(spearmanr(x, y).statistic)
