"""Choosing the stage-2 ridge by k-fold cross-validation, against "no fold".

For a kept layer p with per-group Gram statistics ``G_g = M_gᵀM_g``, ``C_g = M_gᵀZ_g`` and ``z_g = ‖Z_g‖²``
(:func:`.statistics.gram_statistics`; ``G = Σ G_g``) and a ridge λ, group ``g`` is predicted by the fit on the other
groups, ``T_g = solve_ridge(G − G_g, C − C_g, λ, prior="identity")``. Two cross-validated scores of λ:

* **reconstruction error** (closed form, no forward): how far the folded layer's held-out outputs land from the aligned
  dense hidden states, :math:`E(\\lambda) = \\sum_g \\|M_g T_g - Z_g\\|^2 = \\sum_g \\mathrm{tr}(T_g^\\top G_g T_g) -
  2\\,\\mathrm{tr}(T_g^\\top C_g) + z_g`, exactly, from the statistics alone;
* **loss**: the summed next-token loss of group ``g``'s windows with ``T_g`` folded into layer p, from a forward resumed
  at layer p (a fold changes nothing before it), over all groups, divided by all predicted tokens.

The search (our design, not the paper's): every λ of a wide log grid (:data:`RIDGE_GRID`, 1e-4 … 1e4) is scored by its
reconstruction error, which costs only ``d × d`` solves; if the best sits at an end of the grid, the grid is extended
by factors of 10 in that direction (to 1e-8 / 1e8) until it does not, so the chosen λ is never an end of the range
searched. The ``verify`` best λ by reconstruction error are then scored by their cross-validated LOSS (one engine sweep
each, all groups together), and the best of them must beat "no fold" (the current model's loss on all windows) to be
applied, as ``solve_ridge(G, C, λ)`` on all windows. Otherwise the layer is left as it was and the report says so.
A λ given by the user skips the search and is only checked against "no fold". The eigenvalues of ``G`` are
computed once per layer (:class:`.fit.Spectrum`), not once per λ.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ..engine import Candidate, Trajectory
from ..projection import solve_ridge
from .fit import Spectrum, conditioned_ridge, fold_overrides
from .statistics import GramStats
from .trained import CHECKPOINTS, train_projection

#: Relative ridges scored by reconstruction error (extended past an end when the best sits there).
RIDGE_GRID = tuple(10.0 ** e for e in range(-4, 5))
#: How far the grid may be extended (powers of ten).
RIDGE_LIMITS = (1e-8, 1e8)
#: λ values verified by the cross-validated loss (each costs one resumed engine sweep).
VERIFY = 2


def _solve(G: torch.Tensor, C: torch.Tensor, lam: float, overwrite: bool = False) -> torch.Tensor | None:
    try:
        T = solve_ridge(G, C, lam, prior="identity", overwrite=overwrite)
    except torch.linalg.LinAlgError:
        return None
    return T if torch.isfinite(T).all() else None


def _reconstruction_of(stats: GramStats, g: int, T: torch.Tensor) -> float:
    """Reconstruction error ``‖M_g T − Z_g‖²`` of group ``g`` from its statistics (module docstring)."""
    return float((stats.G[g] @ T * T).sum() - 2 * (T * stats.C[g]).sum() + stats.z[g])


def reconstruction_error(stats: GramStats, lam: float) -> float:
    """Cross-validated reconstruction error ``E(λ)`` (module docstring; hidden-state units squared, summed over the
    held-out tokens); NaN when a group's solve fails."""
    G, C = stats.total()
    total = 0.0
    for g in range(len(stats.G)):
        T = _solve(G - stats.G[g], C - stats.C[g], lam, overwrite=True)
        if T is None:
            return math.nan
        total += _reconstruction_of(stats, g, T)
    return total


def no_fold_reconstruction_error(stats: GramStats) -> float:
    """``E`` of the identity (no fold): ``Σ_g tr(G_g) − 2 tr(C_g) + z_g``."""
    return float(sum(torch.trace(G) - 2 * torch.trace(C) + z for G, C, z in zip(stats.G, stats.C, stats.z)))


class _SolveFailed(Exception):
    """A held-out group's ridge solve failed (singular or non-finite): the λ scores NaN."""


def cross_validated_loss(traj: Trajectory, position: int, stats: GramStats, lam: float) -> float:
    """Cross-validated mean next-token loss (nats/token) of folding ridge-``lam`` fits into kept layer ``position``
    (module docstring); NaN when a group's solve fails."""
    G, C = stats.total()

    def fit(g: int) -> torch.Tensor:
        T = _solve(G - stats.G[g], C - stats.C[g], lam, overwrite=True)
        if T is None:
            raise _SolveFailed(g)
        return T

    try:
        return held_out_loss(traj, position, fit, desc=f"stage 2 ridge {lam:g}")
    except _SolveFailed:  # every rank holds the same all-reduced statistics, so every rank fails alike
        return math.nan


def held_out_loss(traj: Trajectory, position: int, fit: Callable[[int], torch.Tensor], *,
                  desc: str = "stage 2") -> float:
    """Mean next-token loss (nats/token) over all windows when group ``g``'s windows run with ``fit(g)`` (a
    ``[d, d]`` T fitted WITHOUT group ``g``) folded into kept layer ``position``: one engine sweep resumed at that
    layer. ``fit(g)`` is called, and its fold built, only when the sweep reaches the layer, and dropped after it: one
    folded ``down_proj`` and one ``T`` are alive at a time, not one per group. An exception ``fit`` raises
    propagates."""
    engine = traj.engine
    orig = traj.view.kept[position]
    candidates = [Candidate(position, overrides=lambda g=g: fold_overrides(engine, traj.view, orig, fit(g)),
                            batches=members)
                  for g, members in enumerate(traj.windows.group_batches())]
    losses = traj.candidate_losses(candidates, desc=desc)
    total = sum(t for t, _ in losses)
    count = sum(c for _, c in losses)
    return total / max(count, 1)


def _conditioned(spectrum, requested: float, notes: list[str]) -> float | None:
    lam, cond = conditioned_ridge(spectrum, requested)
    if lam is None:
        notes.append(f"ridge {requested:g}: no ridge up to 1e32 conditions it (zero or non-finite); skipped")
    elif lam != requested:
        notes.append(f"ridge {requested:g} raised to {lam:g} (Gram matrix condition number {cond:.3g})")
    return lam


def search_ridges(stats: GramStats, ridges: tuple[float, ...] = RIDGE_GRID) -> tuple[dict[float, float], list[str]]:
    """Reconstruction error of every ridge of ``ridges`` (conditioned), the grid extended past an end that is best.

    Returns:
        ``({λ: E(λ)}, notes)`` (λ after any conditioning raise; notes on raises).
    """
    G, _ = stats.total()
    spectrum = Spectrum.of(G)
    notes: list[str] = []
    errors: dict[float, float] = {}
    for requested in ridges:
        lam = _conditioned(spectrum, requested, notes)
        if lam is not None and lam not in errors:
            errors[lam] = reconstruction_error(stats, lam)
    while errors:
        finite = {k: v for k, v in errors.items() if math.isfinite(v)}
        if not finite:
            break
        best = min(finite, key=finite.get)
        low, high = min(errors), max(errors)
        if best == high and high * 10 <= RIDGE_LIMITS[1]:
            nxt = high * 10
        elif best == low and low / 10 >= RIDGE_LIMITS[0]:
            nxt = low / 10
        else:
            break
        lam = _conditioned(spectrum, nxt, notes)
        if lam is None or lam in errors:
            break
        errors[lam] = reconstruction_error(stats, lam)
    return errors, notes


def choose_ridge(traj: Trajectory, position: int, stats: GramStats, base_loss: float, *,
                 ridge: float | None = None, verify: int = VERIFY) -> dict:
    """The λ to fold at kept layer ``position`` (module docstring), or ``None`` when no λ beats "no fold".

    Args:
        base_loss: the current model's mean next-token loss on all windows ("no fold", nats/token).
        ridge: a user-given λ (checked against "no fold" only), or ``None`` to search.
        verify: how many of the best λ by reconstruction error are scored by the cross-validated loss.

    Returns:
        ``{"ridge": λ or None, "loss": its cross-validated loss (base_loss if None), "losses": {"none" and each
        verified λ (:g): loss}, "reconstruction": {"none" and each scored λ (:g): E}, "notes": [...]}``.
    """
    G, _ = stats.total()
    if ridge is not None:
        notes: list[str] = []
        lam = _conditioned(Spectrum.of(G), ridge, notes)
        errors = {lam: reconstruction_error(stats, lam)} if lam is not None else {}
        chosen = [lam] if lam is not None else []
    else:
        errors, notes = search_ridges(stats)
        ranked = sorted((v, k) for k, v in errors.items() if math.isfinite(v))
        chosen = [k for _, k in ranked[:verify]]
    losses: dict[str, float] = {"none": base_loss}
    best: tuple[float | None, float] = (None, base_loss)
    for lam in chosen:
        loss = cross_validated_loss(traj, position, stats, lam)
        losses[f"{lam:g}"] = loss
        if loss < best[1]:
            best = (lam, loss)
    return {"ridge": best[0], "loss": best[1], "losses": losses, "notes": notes,
            "reconstruction": {"none": no_fold_reconstruction_error(stats),
                               **{f"{k:g}": v for k, v in sorted(errors.items())}}}


def final_fold(traj: Trajectory, position: int, stats: GramStats, lam: float) -> dict | None:
    """The overrides of the fold fitted on ALL windows with ridge ``lam`` (``None`` if the solve fails)."""
    G, C = stats.total()
    T = _solve(G, C, lam)
    if T is None:
        return None
    return fold_overrides(traj.engine, traj.view, traj.view.kept[position], T)


def choose_trained(traj: Trajectory, position: int, stats: GramStats, base_loss: float, *,
                   checkpoints: tuple[int, ...] = CHECKPOINTS, verify: int = VERIFY) -> dict:
    """The trained projection's step count at kept layer ``position`` (:mod:`.trained`), or ``None`` when no
    trained fold beats "no fold".

    Each group's T is trained on the other groups' statistics (Adam from the identity, :func:`.trained.
    train_projection`), its checkpoints scored by the cross-validated reconstruction error; the ``verify`` best step
    counts are then scored by the cross-validated loss (one resumed sweep each) against ``base_loss``.

    Returns:
        ``{"steps": step count or None, "loss", "losses": {"none" and each verified count: loss},
        "reconstruction": {"none" and every checkpoint: E}, "notes": []}``.
    """
    G, C = stats.total()
    counts = tuple(sorted(set(checkpoints)))
    per_group = []
    for g in range(len(stats.G)):
        tokens = max(stats.tokens - stats.group_tokens[g], 1) if stats.group_tokens else stats.tokens
        per_group.append(train_projection(G - stats.G[g], C - stats.C[g], tokens, steps=max(counts),
                                          checkpoints=counts))
    errors = {c: sum(_reconstruction_of(stats, g, fits[c]) for g, fits in enumerate(per_group)) for c in counts}
    ranked = sorted((v, c) for c, v in errors.items() if math.isfinite(v))
    losses: dict[str, float] = {"none": base_loss}
    best: tuple[int | None, float] = (None, base_loss)
    for _, c in ranked[:verify]:
        loss = held_out_loss(traj, position, lambda g, c=c: per_group[g][c], desc=f"stage 2 trained {c} steps")
        losses[f"{c} steps"] = loss
        if loss < best[1]:
            best = (c, loss)
    return {"steps": best[0], "loss": best[1], "losses": losses, "notes": [],
            "reconstruction": {"none": no_fold_reconstruction_error(stats),
                               **{f"{c} steps": v for c, v in errors.items()}}}


def final_trained_fold(traj: Trajectory, position: int, stats: GramStats, steps: int) -> dict:
    """The overrides of the projection trained for ``steps`` Adam steps on ALL windows (:mod:`.trained`)."""
    G, C = stats.total()
    T = train_projection(G, C, stats.tokens, steps=steps)[steps]
    return fold_overrides(traj.engine, traj.view, traj.view.kept[position], T)
