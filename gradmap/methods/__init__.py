"""Layer-selection methods behind one call: GradMAP and the baselines it is compared with.

=================  =====================================================  ==========  ==============================
method             score (lower = removed first)                          schedule    forward-equivalent passes
=================  =====================================================  ==========  ==============================
``gradmap``        gradient metric of :mod:`gradmap.scoring`              iterative   3 per removed layer
``shortgpt``       Block Influence (:mod:`.shortgpt`)                     one-shot    1
``gromov``         angular distance of a contiguous block (:mod:`.gromov`) one-shot   1
``taylor-plus``    Σ|W ⊙ ∂L/∂W|, first 4 / last 2 kept (:mod:`.taylor_plus`) one-shot 3
``ppl``            leave-one-out calibration PPL (:mod:`.ppl`)            one-shot    < L (resumed forwards)
``sleb``           leave-one-out calibration NLL, re-scored (:mod:`.ppl`) iterative   < Σ_k (L - k)
``blockpruner``    leave-one-sub-block-out PPL (:mod:`.blockpruner`)      iterative   < Σ over decisions of candidates
=================  =====================================================  ==========  ==============================

A pass is one pass over the calibration set; a forward of the current (possibly pruned) model counts 1, a backward
2 (:data:`gradmap.pruning.PASSES_PER_GRADIENT_STEP`). The leave-one-out searches resume every candidate's forward from
cached hidden states (:mod:`gradmap.prefix`) and count the parameter share they run (plus one partial pass per decision to
build the cache); the published algorithms' full-forward counts are the upper bounds in the table. Compensation: ``none`` / ``max-shift`` / ``every-gap``
(GradMAP stage 2, :mod:`gradmap.compensation`) or ``replaceme`` (:mod:`.replaceme`), on top of any method.
"""

from __future__ import annotations

from torch import nn

from ..compensation import MODES, CompensationResult, check_mode, compensate
from ..data import Calibration
from ..pruning import Selection, select_iterative

METHODS = ("gradmap", "shortgpt", "gromov", "taylor-plus", "ppl", "sleb", "blockpruner")
COMPENSATIONS = MODES + ("replaceme",)


def check_method(method: str) -> str:
    """Return ``method`` if it is one of :data:`METHODS`; else raise ``ValueError`` naming them."""
    if method not in METHODS:
        raise ValueError(f"method: {method!r} is not one of {', '.join(METHODS)}")
    return method


def check_compensation(mode: str) -> str:
    """Return ``mode`` if it is one of :data:`COMPENSATIONS`; else raise ``ValueError`` naming them."""
    if mode not in COMPENSATIONS:
        raise ValueError(f"compensate: {mode!r} is not one of {', '.join(COMPENSATIONS)}")
    return mode


def select_layers(model: nn.Module, calibration: Calibration, target: int, *, method: str = "gradmap",
                  metric: str = "grad_update_norm", protected=(), micro_batch: int = 8, backend: str = "hooks",
                  progress: bool = False, verify_top: int = 0) -> Selection:
    """Select and remove ``target`` decoder layers of the dense ``model`` IN PLACE with ``method``.

    Args:
        model: the dense working model (mutated: layers removed; BlockPruner may also zero sub-blocks).
        calibration: calibration windows, the same for every method.
        target: layers to remove (BlockPruner: the parameters of ``target`` layers, see :mod:`.blockpruner`).
        metric, backend: GradMAP's stage-1 metric and gradient-reduction backend (``gradmap`` only).
        verify_top: GradMAP's loss check of its ``verify_top`` lowest-scored layers per decision (``gradmap`` only;
            :func:`gradmap.pruning.select_iterative`).
        protected: original indices never removed.

    Returns:
        :class:`gradmap.pruning.Selection` with ``method`` and ``passes`` filled in.

    Raises:
        ValueError: unknown method, or what the method raises (too many protected layers, unsupported family).
    """
    check_method(method)
    common = dict(protected=protected, micro_batch=micro_batch)
    if method == "gradmap":
        return select_iterative(model, calibration, target, metric=metric, backend=backend, progress=progress,
                                verify_top=verify_top, **common)
    if method == "shortgpt":
        from .shortgpt import select_shortgpt
        return select_shortgpt(model, calibration, target, **common)
    if method == "gromov":
        from .gromov import select_gromov
        return select_gromov(model, calibration, target, **common)
    if method == "taylor-plus":
        from .taylor_plus import select_taylor_plus
        return select_taylor_plus(model, calibration, target, backend=backend, progress=progress, **common)
    if method == "ppl":
        from .ppl import select_ppl
        return select_ppl(model, calibration, target, progress=progress, **common)
    if method == "sleb":
        from .ppl import select_sleb
        return select_sleb(model, calibration, target, progress=progress, **common)
    from .blockpruner import select_blockpruner
    return select_blockpruner(model, calibration, target, progress=progress, **common)


def run_compensation(dense: nn.Module, pruned: nn.Module, kept: list[int], calibration: Calibration, *,
                     mode: str, ridge: float | None = None, micro_batch: int = 8,
                     progress: bool = False) -> CompensationResult:
    """Compensate ``pruned`` IN PLACE with ``mode`` (one of :data:`COMPENSATIONS`); ``dense`` is only read.

    ``none`` returns an empty result; ``max-shift`` / ``every-gap`` run GradMAP stage 2
    (:func:`gradmap.compensation.compensate`, λ chosen by k-fold cross-validation unless ``ridge`` is given);
    ``replaceme`` runs :func:`gradmap.methods.replaceme.replaceme_compensate`.
    """
    check_compensation(mode)
    if mode == "replaceme":
        from .replaceme import replaceme_compensate
        return replaceme_compensate(dense, pruned, kept, calibration, ridge=ridge, micro_batch=micro_batch)
    check_mode(mode)
    return compensate(dense, pruned, kept, calibration, mode=mode, ridge=ridge, micro_batch=micro_batch,
                      progress=progress)
