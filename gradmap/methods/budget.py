"""The removal curve and the quality budget: held-out calibration perplexity after every removal, and the stop rule
"remove layers while that perplexity stays within ``max_increase`` percent of the dense model's".

Held-out data: calibration windows that no method scores with (drawn from the same text, disjoint from the
calibration set: :func:`gradmap.data.build_calibration` with ``exclude``). Every selection method calls the rule
(:meth:`QualityBudget.allows`) with the position of the layer it is about to remove; the rule evaluates the held-out
perplexity of the current model without that layer (one forward resumed from the held-out trajectory's stored hidden
states entering the layer: :meth:`gradmap.engine.Trajectory.candidate_losses`) and refuses the removal that would
exceed the budget. With no budget every removal is allowed and the perplexities are only recorded: the curve of every
run. Each allowed removal also records the parameters removed so far and the throughput of the current model (one
timed forward over the held-out windows, tokens per second on the compute device).

Test-set numbers are never used here: evaluation on the test text is reported separately (:mod:`gradmap.evaluation`).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

from ..engine import Candidate, Trajectory

logger = logging.getLogger(__name__)


@dataclass
class CurvePoint:
    """One point of the removal curve: after ``removed`` layers (the last one ``layer``, ORIGINAL index), the
    held-out calibration perplexity, the decoder parameters removed so far (elements) and the measured forward
    throughput (tokens/s) of the model at that point."""

    removed: int
    layer: int | None
    holdout_ppl: float
    params_removed: int
    tokens_per_s: float


@dataclass
class QualityBudget:
    """Records the removal curve on held-out windows and, with ``max_increase`` (percent), stops the removals.

    Args:
        holdout: trajectory of the held-out windows through the engine's LIVE view.
        max_increase: allowed held-out perplexity increase over the dense model, percent (``None``: no limit).

    Attributes:
        dense_ppl: the dense model's held-out perplexity (measured at construction).
        curve: :class:`CurvePoint` per removal so far, starting with the dense model (``removed=0``).
        stopped: the step at which a removal was refused (``None`` while none was).
    """

    holdout: Trajectory
    max_increase: float | None = None
    curve: list[CurvePoint] = field(default_factory=list)
    stopped: dict | None = None

    def __post_init__(self):
        if self.max_increase is not None and not (math.isfinite(self.max_increase) and self.max_increase > 0):
            raise ValueError(f"max_ppl_increase: must be a positive percentage, got {self.max_increase}")
        self.dense_ppl, rate = self._measure()
        self.curve.append(CurvePoint(0, None, self.dense_ppl, 0, rate))

    def _measure(self) -> tuple[float, float]:
        """Held-out perplexity of the current view and its forward throughput (tokens/s, one full forward)."""
        engine = self.holdout.engine
        plain = engine.trajectory(self.holdout.windows, view=self.holdout.view.copy(), keep=False)
        t0 = time.perf_counter()
        try:
            total, count = plain.loss()
        finally:
            engine.release(plain)
        seconds = time.perf_counter() - t0
        tokens = int(self.holdout.windows.attention_mask.sum())
        return math.exp(total / max(count, 1)), tokens / max(seconds, 1e-9)

    @property
    def limit(self) -> float | None:
        """The largest held-out perplexity allowed (``None``: no budget)."""
        return None if self.max_increase is None else self.dense_ppl * (1 + self.max_increase / 100)

    def allows(self, position: int) -> bool:
        """Whether removing the layer at ``position`` of the live view keeps the held-out perplexity within the
        budget (always True without one). The caller removes the layer only when it is allowed, then calls
        :meth:`removed`."""
        if self.limit is None:
            return True
        total, count = self.holdout.candidate_losses([Candidate(position, skip=True)], desc="held-out check")[0]
        ppl = math.exp(total / max(count, 1))
        if ppl > self.limit:
            orig = self.holdout.view.kept[position]
            self.stopped = {"step": len(self.curve), "layer": orig, "holdout_ppl": ppl, "limit": self.limit}
            logger.info("quality budget: removing layer %d would give held-out PPL %.3f > %.3f (dense %.3f + %g %%): "
                        "stopping after %d layers", orig, ppl, self.limit, self.dense_ppl, self.max_increase,
                        len(self.curve) - 1)
            return False
        return True

    def removed(self, orig: int) -> None:
        """Record the curve point after layer ``orig`` left the live view."""
        engine = self.holdout.engine
        ppl, rate = self._measure()
        params = sum(engine.layer_params[i] for i in range(engine.n_layers) if i not in set(engine.view.kept))
        self.curve.append(CurvePoint(len(self.curve), orig, ppl, params, rate))

    def as_dict(self) -> dict:
        """JSON-ready: budget, dense held-out PPL, where it stopped, and the curve."""
        return {"max_ppl_increase": self.max_increase, "dense_holdout_ppl": self.dense_ppl, "limit": self.limit,
                "stopped": self.stopped, "holdout_windows": int(self.holdout.windows.input_ids.shape[0]),
                "holdout_tokens": int(self.holdout.windows.attention_mask.sum()),
                "curve": [vars(p) for p in self.curve]}
