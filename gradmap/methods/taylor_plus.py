"""Shortened LLaMA Taylor+ (Kim et al., arXiv 2402.02834, Sec. 3.1, Eq. 2 and "Taylor+"), one-shot, one backward.

:math:`I_l = \\sum_{W \\in l} \\sum_{ij} |W_{ij}\\,\\partial L/\\partial W_{ij}|` over the layer's weight matrices,
from one forward + backward of the LM loss on the calibration set (:func:`gradmap.scoring.layer_scores` with
``metric="taylor"``). The "+" variant never removes the first 4 and the last 2 decoder layers (their heuristic, since
those layers carry outsized importance). Lowest ``I_l`` removed first. Cost: 3 forward-equivalents.
"""

from __future__ import annotations

from torch import nn

from ..adapters import get_adapter
from ..data import Calibration
from ..pruning import PASSES_PER_GRADIENT_STEP, Selection
from ..scoring import layer_scores
from .common import one_shot_selection, remove_by_original

KEEP_FIRST = 4
KEEP_LAST = 2


def taylor_plus_protected(num_layers: int) -> list[int]:
    """Original indices Taylor+ never removes: the first :data:`KEEP_FIRST` and last :data:`KEEP_LAST` layers."""
    return sorted(set(range(min(KEEP_FIRST, num_layers))) | set(range(max(num_layers - KEEP_LAST, 0), num_layers)))


def select_taylor_plus(model: nn.Module, calibration: Calibration, target: int, *, protected=(), micro_batch: int = 8,
                       backend: str = "hooks", progress: bool = False) -> Selection:
    """Remove the ``target`` lowest-Taylor layers outside the first 4 / last 2 (and ``protected``) IN PLACE.

    ``model`` is the dense model (the first/last rule refers to its layer count).

    Raises:
        ValueError: fewer than ``target`` layers left once the first 4, last 2 and ``protected`` are excluded.
    """
    n = len(get_adapter(model).layers(model))
    kept = list(range(n))
    guard = set(taylor_plus_protected(n)) | {int(p) for p in protected}
    if n - len(guard) < target:
        raise ValueError(f"method: taylor-plus keeps the first {KEEP_FIRST} and last {KEEP_LAST} of the {n} layers "
                         f"(and protected {sorted(int(p) for p in protected)}): {n - len(guard)} removable, "
                         f"fewer than the target {target}")
    scores, stats = layer_scores(model, calibration, "taylor", micro_batch=micro_batch, backend=backend,
                                 progress=progress)
    by_orig = {orig: float(s) for orig, s in zip(kept, scores.tolist())}
    selection, victims = one_shot_selection("taylor-plus", by_orig, target, guard, stats.seconds,
                                            passes=PASSES_PER_GRADIENT_STEP)
    selection.extra["protected"] = sorted(guard)
    remove_by_original(model, victims, kept)
    return selection
