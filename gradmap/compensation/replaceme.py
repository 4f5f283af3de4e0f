"""ReplaceMe's linear compensation (Shopkhoev et al., arXiv 2505.02819, Sec. 3, Eq. 4), closed form, no training.

For a removed block that follows kept layer ``p``: with :math:`M` the MLP (``down_proj``) output of layer ``p``,
:math:`X` its output hidden state and :math:`Y` the dense hidden state after the removed block, over all calibration
tokens,

.. math:: T = (M^\\top M + \\alpha I)^{-1} M^\\top (Y - X + M),

accumulated in fp64 and folded as :math:`W_{down} \\leftarrow T^\\top W_{down}` (``nn.Linear`` convention
:math:`y = x W^\\top`), so layer ``p``'s output becomes :math:`X - M + M T \\approx Y`. ReplaceMe pairs this with the
angular-distance block (:mod:`gradmap.methods.gromov`), i.e. one cut. Here it applies to every removed block (every
gap, shallow to deep, each fit seeing the earlier folds), which is exactly ReplaceMe for one contiguous block.

Unlike GradMAP's stage 2 (:func:`gradmap.compensation.compensate`, which cross-validates λ and shrinks ``T`` toward
the identity), nothing is held out: all calibration windows feed the fit, the ridge penalises :math:`\\|T\\|^2` as in
Eq. 4 (``solve_ridge``'s default ``prior="zero"``), it is fixed (:data:`REPLACEME_RIDGE`, relative to the mean
diagonal of :math:`M^\\top M`, as in :func:`gradmap.projection.solve_ridge`) and the fold is always applied. The
statistics, solve and fold reuse :func:`.statistics.gram_statistics` (every token: no attention-sink skip),
:func:`gradmap.projection.solve_ridge` and :func:`.fit.fold_overrides`.
"""

from __future__ import annotations

import logging
import time

from ..engine import Trajectory
from ..projection import solve_ridge
from .fit import CompensationResult, LayerFit, fold_overrides
from .statistics import aligned_dense_layer, gap_positions, gram_statistics

logger = logging.getLogger(__name__)

#: Relative ridge λ (α = λ · mean diag(MᵀM)): keeps the solve well posed when there are fewer calibration tokens
#: than hidden dimensions (MᵀM is then singular; ReplaceMe's own runs use far more tokens than dimensions).
REPLACEME_RIDGE = 1e-3


def replaceme_compensate(traj: Trajectory, dense: Trajectory, *, ridge: float | None = None) -> CompensationResult:
    """Fold ReplaceMe's closed-form T into the ``down_proj`` of the kept layer before every removed block.

    Args:
        traj: the calibration trajectory through the engine's live (pruned) view; the folds become its overrides.
        dense: the calibration trajectory through the dense view.
        ridge: relative ridge λ ≥ 0 (default :data:`REPLACEME_RIDGE`).

    Returns:
        :class:`gradmap.compensation.CompensationResult` with ``mode="replaceme"``, one fit per removed block
        (losses are ``None``: nothing is held out); ``notes`` warns when the fit saw fewer than 4× the hidden size in
        tokens (underdetermined).

    Raises:
        ValueError: negative ridge. ``torch.linalg.LinAlgError``: singular system with ``ridge=0``.
    """
    ridge = REPLACEME_RIDGE if ridge is None else float(ridge)
    if ridge < 0:
        raise ValueError(f"ridge: must be >= 0, got {ridge}")
    engine = traj.engine
    start, work0 = time.perf_counter(), engine.work
    result = CompensationResult(mode="replaceme")
    kept = list(engine.view.kept)
    if kept[0] != 0:
        result.notes.append(f"layers 0..{kept[0] - 1} removed at the start: no kept layer before them to fold into")
    for position in gap_positions(kept, dense.n):
        t0 = time.perf_counter()
        stats = gram_statistics(traj, dense, position, skip_first=0)  # ReplaceMe fits on every calibration token
        G, C = stats.total()
        T = solve_ridge(G, C, ridge)
        engine.set_overrides(kept[position], fold_overrides(engine, traj.view, kept[position], T))
        result.fits.append(LayerFit(layer=kept[position], position=position,
                                    aligned_dense_layer=aligned_dense_layer(kept, position, dense.n), ridge=ridge,
                                    loss_before=None, loss_after=None, candidates={}, applied=True,
                                    tokens=stats.tokens, seconds=time.perf_counter() - t0,
                                    note="ReplaceMe: fixed ridge, all calibration windows, no held-out check"))
    hidden = engine.config.hidden_size
    if result.fits and result.fits[0].tokens < 4 * hidden:
        warning = (f"ReplaceMe fitted T ({hidden}x{hidden}) on {result.fits[0].tokens} calibration tokens, fewer than "
                   f"4x the hidden size: the fit is underdetermined and can ruin the model (seen: PPL 169 -> 9688 "
                   f"at 512 tokens on SmolLM2); use far more calibration tokens, a larger ridge, or every-gap")
        result.notes.append(warning)
        logger.warning(warning)
    result.seconds = time.perf_counter() - start
    result.passes = traj.passes(engine.work - work0)
    return result
