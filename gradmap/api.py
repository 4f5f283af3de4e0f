"""The GradMAP pipeline, top to bottom: calibration → engine → selection → compensation → evaluation → save.

:func:`prune` opens the model on the layer engine (resident, or streamed from its checkpoint when it does not fit
``max_memory``), runs one method's selection (GradMAP's iterative gradient metric, or a baseline) on the calibration
trajectory, compensates (stage 2), evaluates perplexity of the dense, pruned and compensated views, and returns a
:class:`PruneResult` whose :meth:`~PruneResult.save` writes the checkpoint shard by shard. The dense model is never
copied or modified (unless ``inplace=True``): the pruned model is a view of it that shares every tensor but the
removed layers and the folded ``down_proj`` s.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from .adapters import get_adapter, model_device
from .checkpoint import json_writer, save_checkpoint, save_view
from .compensation import CompensationResult, compensate
from .data import Calibration
from .engine import DataParallel, Engine, ModelWeights, View, Windows
from .engine.memory import RunSettings
from .evaluation import perplexity_windows, view_perplexity
from .methods import Selection, select_layers
from .models import open_model, parse_dtype, read_config, resolve_model_path, validate_model
from .names import (DEFAULT_COMPENSATION, DEFAULT_METHOD, DEFAULT_METRIC, check_backend, check_compensation,
                    check_method, check_metric)
from .removal import materialize_pruned, prune_inplace
from .report import environment, plot_scores
from .resume import fingerprint, load_state, write_state
from .validation import ModelLimits, check_prune_plan

logger = logging.getLogger(__name__)

REPORT_FILE = "gradmap_report.json"
PLOT_FILE = "gradmap_scores.png"
DEFAULT_FOLDS = 4


@dataclass
class PruneResult:
    """Outcome of :func:`prune`.

    Attributes:
        model: the pruned (and compensated) model as an ``nn.Module`` sharing the dense model's tensors (resident
            runs; the caller's model itself with ``inplace=True``), or ``None`` for a streamed run (save it).
        removed: removed decoder layers, ORIGINAL indices (0-based in the dense model), in removal order.
        kept: original index of each remaining layer, in order.
        selection: per-step scores (original index → score), timings and passes.
        compensation: stage-2 shifts, fits and notes.
        perplexity: ``{"dense"|"pruned"|"compensated": Perplexity-dict}`` when evaluation tokens were given.
        timings: seconds per stage (``selection``, ``compensation``, ``evaluation``, ``total``).
        settings: the arguments of the run; ``calibration``: how the calibration set was made.
        memory: the memory plan of a run opened from a checkpoint (``None`` for a caller's module).
        lineage: earlier gradmap prunes of the input (from its report), oldest first; ``removed_original`` /
            ``kept_original`` then give the layers by index in the ORIGINAL dense model of the chain.
        tokenizer: the tokenizer of a model opened from a path (``None`` for a caller's module).
    """

    model: nn.Module | None
    removed: list[int]
    kept: list[int]
    selection: Selection
    compensation: CompensationResult
    perplexity: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    settings: dict = field(default_factory=dict)
    calibration: dict = field(default_factory=dict)
    memory: dict | None = None
    lineage: list = field(default_factory=list)
    removed_original: list[int] | None = None
    kept_original: list[int] | None = None
    tokenizer: object = None
    weights: ModelWeights | None = field(default=None, repr=False)
    view: View | None = field(default=None, repr=False)

    def report(self) -> dict:
        """JSON-ready report: removed layers (original indices), scores per step (numbered from 1), shifts, fits,
        timings, passes, PPLs, memory plan, lineage, seed, calibration spec and package versions."""
        comp = self.compensation
        return {
            "method": self.settings.get("method", self.selection.method),
            "settings": self.settings,
            "calibration": self.calibration,
            "num_layers_dense": len(self.kept) + len(self.removed),
            "removed_layers": sorted(self.removed),
            "removal_order": list(self.removed),
            "kept_layers": list(self.kept),
            "lineage": self.lineage,
            "removed_layers_original": self.removed_original,
            "kept_layers_original": self.kept_original,
            "steps": [{"step": s.step, "removed": s.removed, "seconds": s.seconds,
                       "scores": {str(k): v for k, v in s.scores.items()}} for s in self.selection.steps],
            "selection": {"seconds": self.selection.seconds, "forward_equivalent_passes": self.selection.passes,
                          "first_step_layer_scores": {str(k): v for k, v in
                                                      self.selection.first_layer_scores().items()},
                          **self.selection.extra},
            "compensation": {"mode": comp.mode, "seconds": comp.seconds, "forward_equivalent_passes": comp.passes,
                             "notes": comp.notes,
                             "mean_shift": {str(k): v for k, v in comp.shifts.items()},
                             "relative_mean_shift": {str(k): v for k, v in comp.relative_shifts.items()},
                             "fits": [asdict(f) for f in comp.fits]},
            "perplexity": self.perplexity,
            "timings": self.timings,
            "memory": self.memory,
            "environment": environment(),
        }

    def save(self, output_dir: str | Path, tokenizer=None, *, overwrite: bool = False) -> Path:
        """Save the pruned model, tokenizer, ``gradmap_report.json`` and ``gradmap_scores.png`` atomically, shard by
        shard, without assembling a streamed model (:func:`gradmap.checkpoint.save_view`).

        The directory loads with plain ``transformers`` (``AutoModelForCausalLM.from_pretrained``), no gradmap needed.

        Raises:
            FileExistsError: ``output_dir`` exists and ``overwrite`` is false (see :mod:`gradmap.checkpoint`).
        """
        report = self.report()
        extra = {REPORT_FILE: json_writer(report)}
        if report["steps"] and all(isinstance(s.removed, int) for s in self.selection.steps):
            title = scores_title(report["method"], self.settings.get("metric"), self.settings.get("verify_top", 0))
            extra[PLOT_FILE] = lambda p: plot_scores(report["steps"], p, title)
        tokenizer = tokenizer if tokenizer is not None else self.tokenizer
        if self.settings.get("inplace"):  # the caller's module IS the pruned model now; the dense view is gone
            return save_checkpoint(self.model, tokenizer, output_dir, overwrite=overwrite, extra=extra)
        return save_view(self.weights, self.view, tokenizer, output_dir, overwrite=overwrite, extra=extra)


def scores_title(method: str, metric: str | None, verify_top: int = 0) -> str:
    """Title of the scores plot: what the plotted scores are and what decided each removal."""
    if method != "gradmap":
        return f"{method} scores (lower = removed first)"
    if verify_top and verify_top > 1:
        return (f"{metric} scores; each step removed, of the {verify_top} lowest, the one with the lowest "
                "calibration loss")
    return f"{metric} scores (lower = removed first)"


def _lineage(path: Path | None) -> list[dict]:
    """The gradmap prunes that produced the model directory ``path`` (from its report), oldest first."""
    if path is None or not (path / REPORT_FILE).is_file():
        return []
    try:
        report = json.loads((path / REPORT_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    earlier = list(report.get("lineage") or [])
    earlier.append({"model": (report.get("settings") or {}).get("model"), "method": report.get("method"),
                    "num_layers_dense": report.get("num_layers_dense"), "kept_layers": report.get("kept_layers"),
                    "removed_layers": report.get("removed_layers"),
                    "kept_layers_original": report.get("kept_layers_original") or report.get("kept_layers")})
    return earlier


def prune(model: nn.Module | str | os.PathLike, calibration: Calibration, *, num_layers: int | None = None,
          ratio: float | None = None, method: str = DEFAULT_METHOD, metric: str = DEFAULT_METRIC,
          compensate_mode: str = DEFAULT_COMPENSATION, ridge: float | None = None,
          protected: list[int] | tuple[int, ...] = (), micro_batch: int = 8, eval_tokens: torch.Tensor | None = None,
          eval_seqlen: int = 1024, eval_max_tokens: int | None = None, seed: int = 0, inplace: bool = False,
          backend: str = "hooks", progress: bool = False, resume: str | Path | None = None, verify_top: int = 0,
          folds: int | None = None, max_memory=None, device: str | torch.device | None = None,
          dtype: str | torch.dtype | None = None) -> PruneResult:
    """Remove ``num_layers`` (or ``ratio`` of the) decoder layers with GradMAP (or a baseline) and repair the model.

    Stage 1 (arXiv 2602.14649 Sec. 3): iteratively score all remaining layers with one forward + backward and drop the
    lowest (:mod:`gradmap.methods.metrics`). Stage 2: measure the hidden-state mean shift of every kept layer against
    the dense model and fold closed-form projections into ``down_proj`` (:mod:`gradmap.compensation`). Every pass runs
    on the layer engine (:mod:`gradmap.engine`), data parallel when a ``torch.distributed`` process group is
    initialised (each rank takes its share of the calibration windows; every rank takes the same decisions).

    Args:
        model: a ``transformers`` causal LM of a supported family (:mod:`gradmap.adapters`) as an ``nn.Module``
            (resident, computed on its own device), or a model directory / ``.gguf`` file / bundled model name,
            opened on ``device`` with the weights resident or streamed from the checkpoint as ``max_memory`` allows.
        calibration: calibration windows (:func:`gradmap.data.build_calibration`).
        num_layers / ratio: how many layers to remove (exactly one; ratio rounds half up).
        method: layer selection, one of :data:`gradmap.names.METHODS`.
        metric: stage-1 metric, one of :data:`gradmap.names.METRICS` (``method="gradmap"`` only).
        compensate_mode: one of :data:`gradmap.names.COMPENSATIONS`.
        ridge: relative ridge for stage 2 (``None``: chosen by k-fold cross-validation on the calibration windows).
        protected: original layer indices never removed.
        micro_batch: calibration windows per forward/backward.
        eval_tokens: LongTensor ``[num_tokens]`` of test text; when given, PPL of the dense, pruned and compensated
            model is measured (``eval_seqlen`` tokens per window, first ``eval_max_tokens`` tokens).
        seed: seeds torch before the run (the calibration windows carry their own seed).
        inplace: with an ``nn.Module``, prune that model itself; by default it is left bit-identical.
        backend: ``"hooks"`` or ``"fused"`` weight-gradient reduction for the weight metrics.
        verify_top: ``method="gradmap"`` only: each decision removes, among the ``verify_top`` lowest-scored layers,
            the one whose removal gives the lowest calibration NLL (our extension; 0 = the paper's metric alone).
        resume: path of a stage-1 state file (:mod:`gradmap.resume`): written after every decision (rank 0); if it
            already holds decisions of the same model, calibration and settings, they are replayed.
        folds: stage-2 cross-validation groups (default ``min(4, nsamples)``; needs ``2 <= folds <= nsamples``).
        max_memory: memory budget in accelerate's notation (``"20GiB"`` or ``{0: "70GiB", "cpu": "200GiB"}``) for a
            model given by path (:mod:`gradmap.engine.memory`).
        device, dtype: compute device and dtype for a model given by path (default: CUDA if available with
            bfloat16, else CPU with float32).

    Returns:
        :class:`PruneResult`.

    Raises:
        ValueError: unknown method, metric or compensation mode, a bad target (:func:`gradmap.validation.
            resolve_target`), calibration windows longer than the model's maximum, a model on the meta device or
            quantized, non-finite scores / Gram matrices, a ``resume`` file recorded for a different run, a run that
            cannot fit ``max_memory``, or options that do not apply (``max_memory``/``device`` with a module).
    """
    check_method(method)
    check_metric(metric)
    check_compensation(compensate_mode)
    check_backend(backend)
    if resume is not None and method != "gradmap":
        raise ValueError(f"resume: only method 'gradmap' records resumable decisions, got method {method!r}")
    if isinstance(verify_top, bool) or not isinstance(verify_top, int) or verify_top < 0:
        raise ValueError(f"verify_top: must be an integer >= 0, got {verify_top!r}")
    if verify_top and method != "gradmap":
        raise ValueError(f"verify_top: applies to method 'gradmap' only, got method {method!r}")
    compensating = compensate_mode != "none"
    parallel = DataParallel()
    start = time.perf_counter()
    if isinstance(model, nn.Module):
        if max_memory is not None or device is not None or dtype is not None:
            raise ValueError("max_memory/device/dtype: apply to a model given by path; a module computes where it is "
                             "(pass the checkpoint directory to stream a model bigger than memory)")
        validate_model(model)
        config = model.config
    else:
        if inplace:
            raise ValueError("inplace: applies to a model given as an nn.Module")
        config = read_config(resolve_model_path(model))  # the config alone: no weights read before the checks
    # every argument is checked here, before any weight is read or any forward pass runs (gradmap.validation)
    limits = ModelLimits.from_config(config)
    target = check_prune_plan(limits, num_layers=num_layers, ratio=ratio, protected=protected,
                              nsamples=calibration.nsamples, compensate=compensate_mode, ridge=ridge,
                              micro_batch=micro_batch, seqlen=calibration.seqlen,
                              eval_seqlen=eval_seqlen if eval_tokens is not None else None)
    nfolds = (min(DEFAULT_FOLDS, calibration.nsamples) if folds is None else folds) if compensating else 1
    if compensating and (isinstance(nfolds, bool) or not isinstance(nfolds, int)
                         or not 2 <= nfolds <= calibration.nsamples):
        raise ValueError(f"folds: need an int with 2 <= folds <= nsamples={calibration.nsamples}, got {nfolds!r}")
    source_path = None
    plan = None
    if isinstance(model, nn.Module):
        param = next(model.parameters())
        weights = ModelWeights(model, get_adapter(model), device=model_device(model), dtype=param.dtype)
        tokenizer = None
    else:
        settings_plan = RunSettings(nsamples=calibration.nsamples, seqlen=calibration.seqlen, micro_batch=micro_batch,
                                    world_size=parallel.world_size, compensate=compensating, folds=nfolds,
                                    candidates=verify_top or (1 if method == "gradmap" else 2),
                                    eval_seqlen=eval_seqlen if eval_tokens is not None else None)
        run_device = torch.device(device) if device is not None else (
            torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
        opened = open_model(model, settings_plan, device=run_device, dtype=parse_dtype(dtype) if dtype else None,
                            max_memory=max_memory)
        weights, tokenizer, source_path, plan = opened.weights, opened.tokenizer, opened.path, opened.plan
        logger.info("model %s: %s on %s (%s; %d of %d layers resident, %.2f GiB of weights)", source_path, plan.mode,
                    plan.device, plan.dtype, plan.resident_layers, weights.n_layers, plan.weights_total / (1 << 30))
    torch.manual_seed(seed)
    settings = {"method": method, "num_layers": target, "ratio": ratio, "metric": metric, "compensate": compensate_mode,
                "ridge": ridge, "protected": sorted(int(p) for p in protected), "micro_batch": micro_batch,
                "folds": nfolds, "seed": seed, "eval_seqlen": eval_seqlen, "eval_max_tokens": eval_max_tokens,
                "backend": backend, "verify_top": verify_top, "device": str(weights.device),
                "dtype": str(weights.dtype).replace("torch.", ""), "world_size": parallel.world_size,
                "inplace": bool(inplace)}
    if source_path is not None:
        settings["model"] = str(model)
    engine = Engine(weights, parallel=parallel, progress=progress)
    recorded = []
    run_id = None
    if resume is not None:
        decisions = {k: settings[k] for k in ("num_layers", "metric", "protected", "micro_batch", "backend", "seed",
                                              "verify_top", "folds", "dtype")}
        run_id = fingerprint(weights, calibration, decisions)
        recorded = load_state(resume, run_id)
        if recorded:
            logger.info("resuming from %s: %d of %d decisions recorded", resume, len(recorded), target)

    timings: dict[str, float] = {"evaluation": 0.0}
    ppl: dict[str, dict] = {}
    eval_windows = None
    if eval_tokens is not None:
        eval_windows = perplexity_windows(eval_tokens, seqlen=eval_seqlen, max_tokens=eval_max_tokens,
                                          micro_batch=4, max_length=limits.max_length)

    def evaluate(name: str) -> None:
        if eval_windows is None:
            return
        t0 = time.perf_counter()
        ppl[name] = view_perplexity(engine, eval_windows, seqlen=eval_seqlen, stride=eval_seqlen).as_dict()
        timings["evaluation"] += time.perf_counter() - t0
        logger.info("PPL %s: %.3f", name, ppl[name]["ppl"])

    try:
        evaluate("dense")
        windows = Windows.from_calibration(calibration, micro_batch, groups=nfolds)
        traj = engine.trajectory(windows)
        # The first forward of the dense model, shared by every method; kept as the dense trajectory for stage 2.
        t0, work0 = time.perf_counter(), engine.work
        traj.forward()
        first_seconds, first_passes = time.perf_counter() - t0, traj.passes(engine.work - work0)
        dense = traj.snapshot() if compensating else None

        def record(selection: Selection) -> None:
            if parallel.is_main:
                write_state(resume, run_id, selection.steps)

        selection = select_layers(traj, target, method=method, metric=metric, protected=protected, backend=backend,
                                  verify_top=verify_top, recorded=recorded,
                                  on_step=record if resume is not None else None)
        new_steps = selection.steps[len(recorded):]
        if new_steps:  # the shared first forward is part of the selection's cost
            new_steps[0].seconds += first_seconds
            selection.passes += first_passes
        timings["selection"] = selection.seconds
        evaluate("pruned")
        comp = compensate(traj, dense, mode=compensate_mode, ridge=ridge) if compensating else \
            CompensationResult(mode="none")
        timings["compensation"] = comp.seconds
        if dense is not None:
            engine.release(dense)
        engine.release(traj)
        if compensating:
            evaluate("compensated")
        view = engine.view.copy()
    finally:
        engine.close()
    if isinstance(model, nn.Module) and inplace:
        prune_inplace(model, view, weights.adapter)
        pruned = model
    elif all(weights.is_live(u) for u in weights.placement):
        pruned = materialize_pruned(weights, view)
    else:
        pruned = None
    timings["total"] = time.perf_counter() - start
    lineage = _lineage(source_path)
    removed_original = kept_original = None
    if lineage:
        base = lineage[-1]["kept_layers_original"]
        kept_original = [base[i] for i in view.kept]
        removed_original = [base[i] for i in selection.removed]
    return PruneResult(model=pruned, removed=list(selection.removed), kept=list(view.kept), selection=selection,
                       compensation=comp, perplexity=ppl, timings=timings, settings=settings,
                       calibration=dict(calibration.spec), memory=plan.as_dict() if plan else None,
                       lineage=lineage, removed_original=removed_original, kept_original=kept_original,
                       tokenizer=tokenizer, weights=weights, view=view)


__all__ = ["DEFAULT_COMPENSATION", "DEFAULT_METHOD", "DEFAULT_METRIC", "PruneResult", "prune"]
