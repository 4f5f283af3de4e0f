"""Stage 2 of GradMAP: measure the hidden-state mean shift, fit a projection in closed form, fold it into ``down_proj``.

GradMAP (arXiv 2602.14649, Sec. 3, stage 2) finds the layer whose hidden states drift most from the dense model after
pruning and corrects the drift with one projection matrix, reparameterised into that layer's down projection, so the
result keeps the plain architecture. Modes (:data:`gradmap.names.COMPENSATIONS`):

* ``max-shift``: only the kept layer with the largest mean shift (the paper's choice of layer), closed-form fit;
* ``trained``: the paper's stage 2 as described: the max-shift layer, its projection TRAINED by Adam on the MSE
  with a regulariser (:mod:`.trained`) instead of solved in closed form;
* ``every-gap``: the kept layer before each removed block, shallow to deep, each fit seeing the earlier folds;
* ``replaceme``: ReplaceMe's closed-form T at every gap (:mod:`.replaceme`, the baseline's own rule);
* ``none``.

The default is :data:`gradmap.names.DEFAULT_COMPENSATION` (chosen by measurement, ``docs/compensation_selection.md``).
``fit="trained"`` also trains the every-gap / max-shift projections (measured there too).

Steps, each in its own module: :mod:`.statistics` (alignment, mean shifts, Gram statistics from the engine's stored
hidden states), :mod:`.fit` (ridge, conditioning, fold as engine overrides), :mod:`.trained` (the Adam-trained
projection), :mod:`.cross_validation` (the ridge, or the trained projection's step count, is chosen by k-fold
cross-validation, and the fold must beat "no fold" in cross-validated next-token loss). The folds become overrides of the
engine's live view: the dense weights are never modified, and the pruned model's ``down_proj`` tensors are new only
where a fold was applied.
"""

from __future__ import annotations

import logging
import math
import time

from ..engine import Trajectory
from ..names import COMPENSATIONS, FITS, STAGE2_MODES, check_compensation, check_fit
from .cross_validation import RIDGE_GRID, choose_ridge, choose_trained, final_fold, final_trained_fold
from .fit import CompensationResult, LayerFit
from .replaceme import replaceme_compensate
from .trained import TRAINED_RIDGE
from .statistics import SKIP_FIRST, aligned_dense_layer, gap_positions, gram_statistics, mean_shifts

logger = logging.getLogger(__name__)


def compensate(traj: Trajectory, dense: Trajectory, *, mode: str = "every-gap", ridge: float | None = None,
               fit: str | None = None) -> CompensationResult:
    """Compensate the engine's live view (the pruned model) with ``mode``.

    Args:
        traj: the calibration trajectory through the live (pruned) view; its windows' groups are the
            cross-validation folds (:class:`gradmap.engine.Windows`, ``groups`` ≥ 2 to compensate).
        dense: the calibration trajectory through the dense view (:meth:`gradmap.engine.Trajectory.snapshot`).
        mode: one of :data:`gradmap.names.COMPENSATIONS`.
        ridge: relative ridge λ; ``None`` searches a wide grid by cross-validation (:mod:`.cross_validation`, GradMAP
            modes) or uses ReplaceMe's fixed default. A fixed λ is still cross-validated against "no fold".
        fit: how the projection is fitted at each chosen layer: ``"ridge"`` (closed form) or ``"trained"`` (Adam,
            :mod:`.trained`); default ``"trained"`` for mode ``trained``, else ``"ridge"``. ``ridge`` applies to the
            closed form only.

    Returns:
        :class:`CompensationResult` (shifts, fits with their cross-validated losses, notes, seconds, passes).

    Raises:
        ValueError: unknown mode, a negative/NaN ridge, fewer than 2 groups when compensating, or a Gram matrix with
            NaN/inf (fp16 overflow). An ill-conditioned Gram matrix is not an error: the ridge is raised and the raise
            is reported in ``notes``.
    """
    check_compensation(mode)
    if ridge is not None and not (math.isfinite(ridge) and ridge >= 0):
        raise ValueError(f"ridge: must be a finite number >= 0, got {ridge}")
    fit = fit if fit is not None else ("trained" if mode == "trained" else "ridge")
    check_fit(fit)
    if fit == "trained" and ridge is not None:
        raise ValueError("ridge: applies to the closed-form fit; the trained fit has its own weak ridge "
                         "(gradmap.compensation.trained.TRAINED_RIDGE)")
    if fit == "trained" and mode == "replaceme":
        raise ValueError("fit: ReplaceMe is its own closed-form rule; fit 'trained' applies to the GradMAP modes")
    if mode == "none":
        return CompensationResult(mode=mode)
    if mode == "replaceme":
        return replaceme_compensate(traj, dense, ridge=ridge)
    if traj.windows.groups < 2:
        raise ValueError("calibration: stage 2 needs at least 2 cross-validation groups of windows (folds >= 2)")
    engine = traj.engine
    start, work0 = time.perf_counter(), engine.work
    result = CompensationResult(mode=mode)
    kept = list(engine.view.kept)
    shifts, relative = mean_shifts(traj, dense)
    result.shifts, result.relative_shifts = dict(zip(kept, shifts)), dict(zip(kept, relative))
    result.fit = fit
    if mode in ("max-shift", "trained"):
        positions = [max(range(len(kept)), key=lambda p: shifts[p])]
    else:
        positions = gap_positions(kept, dense.n)
        if kept[0] != 0:
            result.notes.append(f"layers 0..{kept[0] - 1} removed at the start: no kept layer before them to fold into")
    base_loss = None
    for position in positions:
        t0 = time.perf_counter()
        orig = kept[position]
        if base_loss is None:  # the model without this fold (earlier folds applied), on all windows
            total, count = traj.loss()
            base_loss = total / max(count, 1)
        stats = gram_statistics(traj, dense, position, skip_first=SKIP_FIRST)
        G, _ = stats.total()
        silent = float(G.diagonal().sum()) == 0.0  # a zeroed down_proj (BlockPruner's removed MLP) gives M = 0
        steps = None
        if silent:
            choice = {"ridge": None, "loss": base_loss, "losses": {"none": base_loss}, "notes": [],
                      "reconstruction": {}}
            lam = None
        elif fit == "trained":
            choice = choose_trained(traj, position, stats, base_loss)
            steps = choice["steps"]
            lam = TRAINED_RIDGE if steps is not None else None
        else:
            choice = choose_ridge(traj, position, stats, base_loss, ridge=ridge)
            lam = choice["ridge"]
        loss, candidates, raised = choice["loss"], choice["losses"], choice["notes"]
        for r in raised:
            result.notes.append(f"layer {orig}: ill-conditioned Gram matrix: {r}")
            logger.warning("stage 2: layer %d: ill-conditioned Gram matrix: %s", orig, r)
        if steps is not None:
            overrides = final_trained_fold(traj, position, stats, steps)
        else:
            overrides = final_fold(traj, position, stats, lam) if lam is not None else None
        if lam is not None and overrides is None:
            note = f"ridge {lam:g}: the solve on all windows failed: fold skipped, layer left unchanged"
        elif silent:
            note = "the down_proj output is zero on every calibration token (MLP removed or dead): nothing to fold into"
        elif lam is None:
            note = (f"no {'trained projection' if fit == 'trained' else 'ridge'} lowered the cross-validated loss: "
                    "fold skipped, layer left unchanged")
        else:
            note = f"trained: {steps} Adam steps (ridge {lam:g})" if steps is not None else ""
        applied = overrides is not None
        if applied:
            engine.set_overrides(orig, overrides)
        else:
            result.notes.append(f"layer {orig}: {note}")
        layer_fit = LayerFit(layer=orig, position=position,
                             aligned_dense_layer=aligned_dense_layer(kept, position, dense.n),
                             ridge=lam if applied else None, loss_before=base_loss,
                             loss_after=loss if applied else base_loss, candidates=candidates, applied=applied,
                             tokens=stats.tokens, seconds=time.perf_counter() - t0, note=note,
                             reconstruction=choice["reconstruction"], steps=steps if applied else None)
        result.fits.append(layer_fit)
        logger.info("stage 2: layer %d -> cross-validated loss %.4f -> %.4f (ridge %s)%s", orig, base_loss,
                    layer_fit.loss_after, f"{lam:g}" if applied else "none", "" if applied else " [skipped]")
        if applied:
            base_loss = None  # the next layer's "no fold" baseline includes this fold: measured again
    result.seconds = time.perf_counter() - start
    result.passes = traj.passes(engine.work - work0)
    return result


__all__ = ["COMPENSATIONS", "FITS", "STAGE2_MODES", "CompensationResult", "LayerFit", "RIDGE_GRID", "SKIP_FIRST",
           "aligned_dense_layer", "compensate", "gap_positions", "gram_statistics", "mean_shifts"]
