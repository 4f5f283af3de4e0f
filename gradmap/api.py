"""The GradMAP pipeline, top to bottom: calibration → scores → removal → compensation → evaluation → save."""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from .adapters import get_adapter
from .checkpoint import json_writer, save_checkpoint
from .compensation import CompensationResult
from .data import Calibration
from .evaluation import perplexity
from .methods import check_compensation, check_method, run_compensation, select_layers
from .models import validate_model
from .pruning import Selection, select_iterative
from .removal import remove_layers
from .report import environment, plot_scores
from .resume import fingerprint, load_state, write_state
from .scoring import BACKENDS, check_metric
from .validation import ModelLimits, check_prune_plan

logger = logging.getLogger(__name__)

DEFAULT_METHOD = "gradmap"
DEFAULT_METRIC = "grad_update_norm"
DEFAULT_COMPENSATION = "every-gap"
REPORT_FILE = "gradmap_report.json"
PLOT_FILE = "gradmap_scores.png"


@dataclass
class PruneResult:
    """Outcome of :func:`prune`.

    Attributes:
        model: the pruned (and compensated) model; a new object unless ``inplace=True``.
        removed: removed decoder layers, ORIGINAL indices (0-based in the dense model), in removal order.
        kept: original index of each remaining layer, in order.
        selection: per-step scores (original index → score) and timings.
        compensation: stage-2 shifts, fits and notes.
        perplexity: ``{"dense"|"pruned"|"compensated": Perplexity-dict}`` when evaluation tokens were given.
        timings: seconds per stage (``scoring``, ``compensation``, ``evaluation``, ``total``).
        settings: the arguments of the run; ``calibration``: how the calibration set was made.
    """

    model: nn.Module
    removed: list[int]
    kept: list[int]
    selection: Selection
    compensation: CompensationResult
    perplexity: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    settings: dict = field(default_factory=dict)
    calibration: dict = field(default_factory=dict)

    def report(self) -> dict:
        """JSON-ready report: removed layers (original indices), scores per step, shifts, fits, timings, PPLs, seed,
        calibration spec and package versions."""
        comp = self.compensation
        return {
            "method": self.settings.get("method", self.selection.method),
            "settings": self.settings,
            "calibration": self.calibration,
            "num_layers_dense": len(self.kept) + len(self.removed),
            "removed_layers": sorted(self.removed),
            "removal_order": list(self.removed),
            "kept_layers": list(self.kept),
            "steps": [{"step": s.step, "removed": s.removed, "seconds": s.seconds,
                       "scores": {str(k): v for k, v in s.scores.items()}} for s in self.selection.steps],
            "selection": {"seconds": self.selection.seconds, "forward_equivalent_passes": self.selection.passes,
                          "first_step_layer_scores": {str(k): v for k, v in
                                                      self.selection.first_layer_scores().items()},
                          **self.selection.extra},
            "compensation": {"mode": comp.mode, "seconds": comp.seconds, "notes": comp.notes,
                             "mean_shift": {str(k): v for k, v in comp.shifts.items()},
                             "relative_mean_shift": {str(k): v for k, v in comp.relative_shifts.items()},
                             "fits": [asdict(f) for f in comp.fits]},
            "perplexity": self.perplexity,
            "timings": self.timings,
            "environment": environment(),
        }

    def save(self, output_dir: str | Path, tokenizer=None, *, overwrite: bool = False) -> Path:
        """Save the pruned model, tokenizer, ``gradmap_report.json`` and ``gradmap_scores.png`` atomically.

        The directory loads with plain ``transformers`` (``AutoModelForCausalLM.from_pretrained``), no gradmap needed.

        Raises:
            FileExistsError: ``output_dir`` exists and ``overwrite`` is false (see :mod:`gradmap.checkpoint`).
        """
        report = self.report()
        extra = {REPORT_FILE: json_writer(report)}
        if report["steps"] and all(isinstance(s.removed, int) for s in self.selection.steps):
            name = self.settings.get("metric") if report["method"] == "gradmap" else report["method"]
            extra[PLOT_FILE] = lambda p: plot_scores(report["steps"], p, f"{name} scores")
        return save_checkpoint(self.model, tokenizer, output_dir, overwrite=overwrite, extra=extra)


class _EvalMode:
    """Put a model in eval mode for the duration, restoring its previous mode."""

    def __init__(self, model: nn.Module):
        self.model, self.was_training = model, model.training

    def __enter__(self):
        self.model.eval()

    def __exit__(self, *exc):
        self.model.train(self.was_training)


def prune(model: nn.Module, calibration: Calibration, *, num_layers: int | None = None, ratio: float | None = None,
          method: str = DEFAULT_METHOD, metric: str = DEFAULT_METRIC, compensate_mode: str = DEFAULT_COMPENSATION, ridge: float | None = None,
          protected: list[int] | tuple[int, ...] = (), micro_batch: int = 8, eval_tokens: torch.Tensor | None = None,
          eval_seqlen: int = 1024, eval_max_tokens: int | None = None, seed: int = 0, inplace: bool = False,
          backend: str = "hooks", progress: bool = False, resume: str | Path | None = None,
          verify_top: int = 0) -> PruneResult:
    """Remove ``num_layers`` (or ``ratio`` of the) decoder layers with GradMAP (or a baseline) and repair the model.

    Stage 1 (arXiv 2602.14649 Sec. 3): iteratively score all remaining layers with one forward + backward and drop the
    lowest (:mod:`gradmap.scoring`). Stage 2: measure the hidden-state mean shift of every kept layer against the dense
    model and fold closed-form projections into ``down_proj`` (:mod:`gradmap.compensation`).

    Args:
        model: a ``transformers`` causal LM of a supported family (:mod:`gradmap.adapters`).
        calibration: calibration windows (:func:`gradmap.data.build_calibration`).
        num_layers / ratio: how many layers to remove (exactly one; ratio rounds half up).
        method: layer selection, one of :data:`gradmap.methods.METHODS` (``"gradmap"``: stage 1 below; the others
            are the baselines of :mod:`gradmap.methods`, sharing everything else in this pipeline).
        metric: stage-1 metric, one of :data:`gradmap.scoring.METRICS` (``method="gradmap"`` only).
        compensate_mode: ``"none"``, ``"max-shift"``, ``"every-gap"`` (GradMAP stage 2) or ``"replaceme"``
            (ReplaceMe's closed-form T, :mod:`gradmap.methods.replaceme`).
        ridge: relative ridge for stage 2 (``None``: chosen by k-fold cross-validation on the calibration windows).
        protected: original layer indices never removed.
        micro_batch: calibration windows per forward/backward.
        eval_tokens: LongTensor ``[num_tokens]`` of test text; when given, PPL of the dense, pruned and compensated
            model is measured (``eval_seqlen`` tokens per window, first ``eval_max_tokens`` tokens).
        seed: seeds torch before the run (the calibration windows carry their own seed).
        inplace: prune ``model`` itself; by default ``model`` is left bit-identical and a copy is pruned.
        backend: ``"hooks"`` or ``"fused"`` weight-gradient reduction for the weight metrics
            (:func:`gradmap.scoring.layer_scores`).
        verify_top: ``method="gradmap"`` only: each decision removes, among the ``verify_top`` lowest-scored layers,
            the one whose removal gives the lowest calibration NLL (our extension, :func:`gradmap.pruning.select_iterative`;
            0 = the paper's metric alone).
        resume: path of a stage-1 state file (:mod:`gradmap.resume`): written after every decision; if it already
            holds decisions of the same model, calibration and settings, they are replayed and scoring continues.

    Returns:
        :class:`PruneResult`.

    Raises:
        ValueError: unknown method, metric or compensation mode, a bad target (see
            :func:`gradmap.pruning.resolve_target`), calibration windows longer than the model's maximum, a model
            on the meta device or quantized, non-finite scores / Gram matrices, or a ``resume`` file recorded for a
            different model, calibration or settings.
    """
    check_method(method)
    check_metric(metric)
    check_compensation(compensate_mode)
    if resume is not None and method != "gradmap":
        raise ValueError(f"resume: only method 'gradmap' records resumable decisions, got method {method!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend: {backend!r} is not one of {', '.join(BACKENDS)}")
    if isinstance(verify_top, bool) or not isinstance(verify_top, int) or verify_top < 0:
        raise ValueError(f"verify_top: must be an integer >= 0, got {verify_top!r}")
    if verify_top and method != "gradmap":
        raise ValueError(f"verify_top: applies to method 'gradmap' only, got method {method!r}")
    validate_model(model)
    adapter = get_adapter(model)
    n_dense = len(adapter.layers(model))
    # every argument is checked here, before the first forward pass (gradmap.validation)
    limits = ModelLimits(model.config.model_type, n_dense, getattr(model.config, "max_position_embeddings", None))
    target = check_prune_plan(limits, num_layers=num_layers, ratio=ratio,
                              protected=protected, nsamples=calibration.nsamples, compensate=compensate_mode,
                              ridge=ridge, micro_batch=micro_batch,
                              eval_seqlen=eval_seqlen if eval_tokens is not None else None)
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and calibration.seqlen > limit:
        raise ValueError(f"calibration: seqlen {calibration.seqlen} exceeds the model's maximum {limit}")
    torch.manual_seed(seed)
    settings = {"method": method, "num_layers": target, "ratio": ratio, "metric": metric, "compensate": compensate_mode,
                "ridge": ridge, "protected": sorted(int(p) for p in protected), "micro_batch": micro_batch,
                "seed": seed, "eval_seqlen": eval_seqlen, "eval_max_tokens": eval_max_tokens, "backend": backend,
                "verify_top": verify_top}
    timings: dict[str, float] = {}
    ppl: dict[str, dict] = {}
    start = time.perf_counter()
    recorded = []
    if resume is not None:
        decisions = {k: settings[k] for k in ("num_layers", "metric", "protected", "micro_batch", "backend", "seed",
                                              "verify_top")}
        run_id = fingerprint(model, calibration, decisions)
        recorded = load_state(resume, run_id)
        if recorded:
            logger.info("resuming from %s: %d of %d decisions recorded", resume, len(recorded), target)

    def evaluate(name: str, m: nn.Module) -> None:
        if eval_tokens is None:
            return
        t0 = time.perf_counter()
        with _EvalMode(m):
            ppl[name] = perplexity(m, eval_tokens, seqlen=eval_seqlen, max_tokens=eval_max_tokens,
                                   progress=progress).as_dict()
        timings["evaluation"] = timings.get("evaluation", 0.0) + time.perf_counter() - t0
        logger.info("PPL %s: %.3f", name, ppl[name]["ppl"])

    evaluate("dense", model)
    needs_dense = compensate_mode != "none"
    if inplace:
        dense = copy.deepcopy(model) if needs_dense else None
        work = model
    else:
        dense = model if needs_dense else None
        work = copy.deepcopy(model)
    work.eval()

    # Stage 1: layer selection and removal (GradMAP's iterative gradient metric, resumable; or a baseline).
    if method == "gradmap":
        kept = list(range(n_dense))
        selection = Selection()
        for step in recorded:  # resumed: replay the recorded decisions without scoring
            remove_layers(work, [kept.index(step.removed)], adapter)
            kept.remove(step.removed)
            selection.removed.append(step.removed)
            selection.steps.append(step)
        while len(selection.removed) < target:
            select_iterative(work, calibration, len(selection.removed) + 1, metric=metric, protected=protected,
                             micro_batch=micro_batch, progress=progress, kept=kept, selection=selection,
                             backend=backend, verify_top=verify_top)
            kept = [i for i in range(n_dense) if i not in set(selection.removed)]
            if resume is not None:
                write_state(resume, run_id, selection.steps)
    else:
        selection = select_layers(work, calibration, target, method=method, metric=metric, protected=protected,
                                  micro_batch=micro_batch, backend=backend, progress=progress)
    kept = [i for i in range(n_dense) if i not in set(selection.removed)]
    timings["scoring"] = selection.seconds
    evaluate("pruned", work)

    # Stage 2: projection compensation (GradMAP's, or ReplaceMe's).
    comp = CompensationResult(mode=compensate_mode)
    if needs_dense:
        with _EvalMode(dense):
            comp = run_compensation(dense, work, kept, calibration, mode=compensate_mode, ridge=ridge,
                                    micro_batch=micro_batch, progress=progress)
        timings["compensation"] = comp.seconds
        evaluate("compensated", work)
    timings["total"] = time.perf_counter() - start
    return PruneResult(model=work, removed=list(selection.removed), kept=kept, selection=selection,
                       compensation=comp, perplexity=ppl, timings=timings, settings=settings,
                       calibration=dict(calibration.spec))
