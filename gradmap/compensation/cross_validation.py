"""Choosing the stage-2 ridge by k-fold cross-validation of the next-token loss, against "no fold".

For a kept layer p with per-group Gram statistics ``G_g``, ``C_g`` (:func:`.statistics.gram_statistics`; ``G = Σ G_g``)
and a ridge λ, each group ``g`` is scored with ``T_g = solve_ridge(G − G_g, C − C_g, λ, prior="identity")`` folded into
layer p: the summed next-token loss of group ``g``'s windows, from a forward resumed at layer p (a fold changes
nothing before it). The cross-validated loss of λ sums over the groups and divides by all predicted tokens. "No fold"
scores the current model on all windows. A fold is kept only if some λ beats "no fold"; then ``solve_ridge(G, C, λ)``
on all windows is folded. Otherwise the layer is left as it was and the report says so.

All groups of one λ run in one engine sweep (:meth:`gradmap.engine.Trajectory.candidate_losses`), each on its own
micro-batches. The eigenvalues of ``G`` are computed once per layer (:class:`.fit.Spectrum`), not once per λ.
"""

from __future__ import annotations

import math

import torch

from ..engine import Candidate, Trajectory
from ..projection import solve_ridge
from .fit import Spectrum, conditioned_ridge, fold_overrides
from .statistics import GramStats


def _solve(G: torch.Tensor, C: torch.Tensor, lam: float) -> torch.Tensor | None:
    try:
        T = solve_ridge(G, C, lam, prior="identity")
    except torch.linalg.LinAlgError:
        return None
    return T if torch.isfinite(T).all() else None


def cross_validated_loss(traj: Trajectory, position: int, stats: GramStats, lam: float) -> float:
    """Cross-validated mean next-token loss (nats/token) of folding ridge-``lam`` fits into kept layer ``position``
    (module docstring); NaN when a group's solve fails."""
    engine = traj.engine
    orig = traj.view.kept[position]
    G, C = stats.total()
    candidates = []
    for g, members in enumerate(traj.windows.group_batches()):
        T = _solve(G - stats.G[g], C - stats.C[g], lam)
        if T is None:
            return math.nan
        candidates.append(Candidate(position, overrides=fold_overrides(engine, traj.view, orig, T), batches=members))
    losses = traj.candidate_losses(candidates, desc=f"stage 2 ridge {lam:g}")
    total = sum(t for t, _ in losses)
    count = sum(c for _, c in losses)
    return total / max(count, 1)


def choose_ridge(traj: Trajectory, position: int, stats: GramStats, ridges: tuple[float, ...], base_loss: float
                 ) -> tuple[float | None, float, dict[str, float], list[str]]:
    """Cross-validate each ridge in ``ridges`` (raised where the Gram matrix needs it, :func:`.fit.conditioned_ridge`)
    against "no fold" (``base_loss``, nats/token).

    Returns:
        ``(λ or None, its cross-validated loss, {"none" and each tried λ: loss}, notes)``: ``None`` when no λ beats
        "no fold" or the statistics are all zero.
    """
    G, _ = stats.total()
    spectrum = Spectrum.of(G)
    candidates: dict[str, float] = {"none": base_loss}
    best: tuple[float | None, float] = (None, base_loss)
    notes: list[str] = []
    for requested in ridges:
        lam, cond = conditioned_ridge(spectrum, requested)
        if lam is None:
            notes.append(f"ridge {requested:g}: no ridge up to 1e32 conditions it (zero or non-finite); skipped")
            candidates[f"{requested:g}"] = math.nan
            continue
        if lam != requested:
            notes.append(f"ridge {requested:g} raised to {lam:g} (Gram matrix condition number {cond:.3g})")
        key = f"{lam:g}"
        if key in candidates:  # two requested ridges raised to the same λ: scored once
            continue
        loss = cross_validated_loss(traj, position, stats, lam)
        candidates[key] = loss
        if loss < best[1]:
            best = (lam, loss)
    return best[0], best[1], candidates, notes


def final_fold(traj: Trajectory, position: int, stats: GramStats, lam: float) -> dict | None:
    """The overrides of the fold fitted on ALL windows with ridge ``lam`` (``None`` if the solve fails)."""
    G, C = stats.total()
    T = _solve(G, C, lam)
    if T is None:
        return None
    return fold_overrides(traj.engine, traj.view, traj.view.kept[position], T)
