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
import math
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
from .engine import DataParallel, Engine, ModelWeights, Trajectory, View, Windows
from .engine.memory import RunSettings
from .evaluation import perplexity_windows, view_perplexity
from .methods import Selection, select_layers
from .models import open_model, parse_dtype, read_config, resolve_model_path, validate_model
from .names import (DEFAULT_COMPENSATION, DEFAULT_METHOD, DEFAULT_METRIC, check_backend, check_compensation,
                    check_method, check_metric)
from .removal import materialize_pruned, prune_inplace
from .methods.budget import QualityBudget
from .methods.gradmap import default_verify_top, default_verify_windows
from .model_card import write_model_card
from .report import environment, plot_curve, plot_scores
from .speed import compare_speed
from .resume import fingerprint, load_state, write_state
from .validation import ModelLimits, check_prune_plan

logger = logging.getLogger(__name__)

REPORT_FILE = "gradmap_report.json"
PLOT_FILE = "gradmap_scores.png"
CURVE_FILE = "gradmap_curve.png"
CARD_FILE = "README.md"
#: Speed measurement: prompt tokens (prefill) and greedy new tokens (decode, KV cache on), batch 1.
SPEED_PROMPT, SPEED_NEW_TOKENS = 128, 32
#: Hub repo ids of the bundled models (the model card's ``base_model``).
HUB_IDS = {"default": "HuggingFaceTB/SmolLM2-135M-Instruct", "smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct",
           "gemma3-270m": "google/gemma-3-270m"}
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
        curve: the removal curve on held-out windows (:meth:`gradmap.methods.budget.QualityBudget.as_dict`, plus
            ``test_ppl`` at the evaluated counts), when ``holdout`` was given.
        speed: dense vs pruned prefill/decode tokens/s (:func:`gradmap.speed.compare_speed`), when measured.
        points: removed-layer count → the :class:`PruneResult` of that save point (``save_at``).
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
    curve: dict | None = None
    speed: dict | None = None
    points: dict = field(default_factory=dict)
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
            "curve": self.curve,
            "speed": self.speed,
            "timings": self.timings,
            "memory": self.memory,
            "environment": environment(),
        }

    def save(self, output_dir: str | Path, tokenizer=None, *, overwrite: bool = False) -> Path:
        """Save the pruned model, tokenizer, ``gradmap_report.json``, the plots (``gradmap_scores.png``, and
        ``gradmap_curve.png`` with a removal curve) and the Hub model card ``README.md``, atomically and shard by
        shard, without assembling a streamed model (:func:`gradmap.checkpoint.save_view`).

        The directory loads with plain ``transformers`` (``AutoModelForCausalLM.from_pretrained``), no gradmap needed.

        Raises:
            FileExistsError: ``output_dir`` exists and ``overwrite`` is false (see :mod:`gradmap.checkpoint`).
        """
        report = self.report()
        extra = {REPORT_FILE: json_writer(report)}
        if report["steps"] and all(isinstance(s.removed, int) for s in self.selection.steps):
            title = scores_title(report["method"], self.settings.get("metric"), self.settings.get("verify_top", 0),
                                 self.settings.get("verify_windows"), self.settings.get("verify_extend", False))
            extra[PLOT_FILE] = lambda p: plot_scores(report["steps"], p, title)
        if self.curve:
            extra[CURVE_FILE] = lambda p: plot_curve(self.curve, p, len(self.removed))
        extra[CARD_FILE] = lambda p: write_model_card(p.parent, report, base_model=self.base_model(),
                                                      curve_png=CURVE_FILE if self.curve else None,
                                                      scores_png=PLOT_FILE if PLOT_FILE in extra else None,
                                                      model_name=Path(output_dir).name)
        tokenizer = tokenizer if tokenizer is not None else self.tokenizer
        if self.settings.get("inplace"):  # the caller's module IS the pruned model now; the dense view is gone
            return save_checkpoint(self.model, tokenizer, output_dir, overwrite=overwrite, extra=extra)
        return save_view(self.weights, self.view, tokenizer, output_dir, overwrite=overwrite, extra=extra)

    def save_points(self, output_dir: str | Path, tokenizer=None, *, overwrite: bool = False) -> dict[int, Path]:
        """Save every save point and the final model as ``output_dir/layers-<count>/`` (:meth:`save` each, same
        atomic-write and overwrite rules).

        Returns:
            removed-layer count → checkpoint path.
        """
        out = Path(output_dir)
        written = {}
        for count, result in sorted({**self.points, len(self.removed): self}.items()):
            written[count] = result.save(out / f"layers-{count}", tokenizer, overwrite=overwrite)
        return written

    def base_model(self) -> str:
        """The Hub repo id of the dense model for the model card (a bundled model's id, the config's name, or the
        directory's name)."""
        name = str(self.settings.get("model") or "")
        if name in HUB_IDS:
            return HUB_IDS[name]
        source = getattr(self.weights.model.config, "_name_or_path", "") if self.weights is not None else ""
        for candidate in (source, name):
            parts = [p for p in str(candidate).split("/") if p]
            if len(parts) >= 2 and not str(candidate).startswith(("/", ".")):
                return "/".join(parts[-2:])
        stem = Path(name or source or "model").name or "model"
        return f"local/{stem}"


def scores_title(method: str, metric: str | None, verify_top: int = 0, verify_windows: int | None = None,
                 verify_extend: bool = False) -> str:
    """Title of the scores plot: what the plotted scores are and what decided each removal."""
    if method != "gradmap":
        return f"{method} scores (lower = removed first)"
    if verify_top and verify_top > 1:
        more = " (or more, while the best was the last checked)" if verify_extend else ""
        on = f" on {verify_windows} calibration windows" if verify_windows else ""
        return (f"{metric} scores; each step removed, of the {verify_top} lowest{more}, the one with the lowest "
                f"calibration loss{on}")
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


@dataclass
class _Spec:
    """A prune run's checked settings (everything :func:`prune` validated before reading weights)."""

    target: int
    folds: int
    settings: dict
    limits: ModelLimits


def _check_arguments(model, calibration: Calibration, *, num_layers, ratio, method, metric, compensate_mode, ridge,
                     protected, micro_batch, eval_tokens, eval_seqlen, verify_top, folds, max_memory, device, dtype,
                     inplace, resume, max_ppl_increase, holdout, save_at, backend, verify_windows=None,
                     verify_margin=None, verify_extend=False) -> _Spec:
    """Every check that needs no weights (names, target, folds, budget, save points) against the model's config."""
    check_method(method)
    check_metric(metric)
    check_compensation(compensate_mode)
    check_backend(backend)
    if compensate_mode == "trained" and ridge is not None:
        raise ValueError("ridge: applies to the closed-form stage 2; compensate 'trained' trains its projection "
                         "(gradmap.compensation.trained)")
    if resume is not None and method != "gradmap":
        raise ValueError(f"resume: only method 'gradmap' records resumable decisions, got method {method!r}")
    default_check = verify_top is None and method == "gradmap"  # sized once the layer count is known (below)
    if verify_top is not None and (isinstance(verify_top, bool) or not isinstance(verify_top, int)
                                   or verify_top < 0):
        raise ValueError(f"verify_top: must be an integer >= 0, got {verify_top!r}")
    if verify_top and method != "gradmap":
        raise ValueError(f"verify_top: applies to method 'gradmap' only, got method {method!r}")
    if verify_windows is not None and (isinstance(verify_windows, bool) or not isinstance(verify_windows, int)
                                       or verify_windows < 1):
        raise ValueError(f"verify_windows: must be a positive number of windows, got {verify_windows!r}")
    if verify_margin is not None and (isinstance(verify_margin, bool) or not isinstance(verify_margin, (int, float))
                                      or not math.isfinite(verify_margin) or verify_margin < 0):
        raise ValueError(f"verify_margin: must be a finite number >= 0 (None: no margin), got {verify_margin!r}")
    if not isinstance(verify_extend, bool):
        raise ValueError(f"verify_extend: must be True or False, got {verify_extend!r}")
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
    limits = ModelLimits.from_config(config)
    if verify_top is None:  # the default: GradMAP's loss check (none on a one-layer model), nothing for the baselines
        verify_top = default_verify_top(limits.num_layers) if default_check else 0
    if (verify_windows is not None or verify_margin is not None) and verify_top < 2:
        raise ValueError("verify_windows/verify_margin: apply to the loss check, which needs verify_top >= 2")
    if verify_extend and verify_top < 2:
        raise ValueError("verify_extend: applies to the loss check, which needs verify_top >= 2")
    if verify_top >= 2 and verify_windows is None:
        verify_windows = default_verify_windows(calibration.nsamples, calibration.seqlen)
    if max_ppl_increase is not None:
        if holdout is None:
            raise ValueError("max_ppl_increase: needs held-out calibration windows (holdout=...), disjoint from the "
                             "calibration set")
        if method == "blockpruner":
            raise ValueError("max_ppl_increase: BlockPruner removes sub-blocks toward a parameter budget; use "
                             "num_layers/ratio with it")
        if num_layers is None and ratio is None:  # the budget alone: the ceiling is every removable layer
            num_layers = limits.num_layers - 1 - len(set(int(p) for p in protected))
    target = check_prune_plan(limits, num_layers=num_layers, ratio=ratio, protected=protected,
                              nsamples=calibration.nsamples, compensate=compensate_mode, ridge=ridge,
                              micro_batch=micro_batch, seqlen=calibration.seqlen,
                              eval_seqlen=eval_seqlen if eval_tokens is not None else None)
    compensating = compensate_mode != "none"
    nfolds = (min(DEFAULT_FOLDS, calibration.nsamples) if folds is None else folds) if compensating else 1
    if compensating and (isinstance(nfolds, bool) or not isinstance(nfolds, int)
                         or not 2 <= nfolds <= calibration.nsamples):
        raise ValueError(f"folds: need an int with 2 <= folds <= nsamples={calibration.nsamples}, got {nfolds!r}")
    points = sorted({int(c) for c in save_at or ()})
    if points and not all(1 <= c <= target for c in points):
        raise ValueError(f"save_at: layer counts must be in [1, {target}] (the target), got {points}")
    if points and method == "blockpruner":
        raise ValueError("save_at: BlockPruner's removal order mixes sub-blocks and layers; it has no layer-count "
                         "save points")
    settings = {"method": method, "num_layers": target, "ratio": ratio, "metric": metric, "compensate": compensate_mode,
                "ridge": ridge, "protected": sorted(int(p) for p in protected), "micro_batch": micro_batch,
                "folds": nfolds, "eval_seqlen": eval_seqlen, "backend": backend, "verify_top": verify_top,
                "verify_windows": verify_windows, "verify_margin": verify_margin, "verify_extend": verify_extend,
                "inplace": bool(inplace), "max_ppl_increase": max_ppl_increase, "save_at": points}
    return _Spec(target, nfolds, settings, limits)


def _open(model, calibration: Calibration, spec: _Spec, *, parallel: DataParallel, max_memory, device, dtype,
          eval_tokens) -> tuple[ModelWeights, object, Path | None, object]:
    """The model's weights on the engine: the caller's module as it is, or a path opened resident or streamed."""
    if isinstance(model, nn.Module):
        param = next(model.parameters())
        return ModelWeights(model, get_adapter(model), device=model_device(model), dtype=param.dtype), None, None, None
    s = spec.settings
    plan_settings = RunSettings(nsamples=calibration.nsamples, seqlen=calibration.seqlen, micro_batch=s["micro_batch"],
                                world_size=parallel.world_size, compensate=s["compensate"] != "none",
                                folds=spec.folds, candidates=s["verify_top"] or (1 if s["method"] == "gradmap" else 2),
                                candidate_windows=s["verify_windows"] if s["verify_top"] >= 2 else None,
                                eval_seqlen=s["eval_seqlen"] if eval_tokens is not None else None)
    run_device = torch.device(device) if device is not None else (
        torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    opened = open_model(model, plan_settings, device=run_device, dtype=parse_dtype(dtype) if dtype else None,
                        max_memory=max_memory)
    plan = opened.plan
    logger.info("model %s: %s on %s (%s; %d of %d layers resident, %.2f GiB of weights)", opened.path, plan.mode,
                plan.device, plan.dtype, plan.resident_layers, opened.weights.n_layers, plan.weights_total / (1 << 30))
    return opened.weights, opened.tokenizer, opened.path, plan


class _Pipeline:
    """The steps of one run on an open engine: evaluation, selection, compensation (module docstring)."""

    def __init__(self, engine: Engine, calibration: Calibration, spec: _Spec, eval_windows: Windows | None,
                 holdout: Calibration | None, resume, run_id, recorded: list):
        self.engine, self.calibration, self.spec = engine, calibration, spec
        self.eval_windows, self.holdout = eval_windows, holdout
        self.resume, self.run_id, self.recorded = resume, run_id, recorded
        self.timings: dict[str, float] = {"evaluation": 0.0}
        self.windows = Windows.from_calibration(calibration, spec.settings["micro_batch"], groups=spec.folds)
        self.dense: Trajectory | None = None
        self.budget: QualityBudget | None = None
        self.views: dict[int, View] = {}  # save points: removed-layer count -> view right after that removal

    def evaluate(self, view: View | None = None) -> dict | None:
        """Test perplexity of ``view`` (default: the live view), or ``None`` without evaluation tokens."""
        if self.eval_windows is None:
            return None
        t0 = time.perf_counter()
        seqlen = self.spec.settings["eval_seqlen"]
        result = view_perplexity(self.engine, self.eval_windows, view, seqlen=seqlen, stride=seqlen).as_dict()
        self.timings["evaluation"] += time.perf_counter() - t0
        return result

    def select(self) -> Selection:
        """The selection, its first complete forward kept as the dense trajectory for stage 2 (a snapshot of the
        stored boundaries, taken when the method's first pass completes), with the removal curve."""
        engine, s = self.engine, self.spec.settings
        traj = engine.trajectory(self.windows)
        first_seconds = first_passes = 0.0
        if s["compensate"] != "none":
            if self.recorded:  # replayed decisions remove layers before any forward: take the dense pass first
                t0, work0 = time.perf_counter(), engine.work
                traj.forward()
                first_seconds, first_passes = time.perf_counter() - t0, traj.passes(engine.work - work0)
                self.dense = traj.snapshot()
            else:
                traj.on_complete = lambda t: setattr(self, "dense", t.snapshot())
        if self.holdout is not None:
            hold = engine.trajectory(Windows.from_calibration(self.holdout, s["micro_batch"]))
            self.budget = _SavePoints(hold, s["max_ppl_increase"], self.views, set(s["save_at"]))
        selection = select_layers(traj, self.spec.target, method=s["method"], metric=s["metric"],
                                  protected=s["protected"], backend=s["backend"], verify_top=s["verify_top"],
                                  verify_windows=s["verify_windows"], verify_extend=s["verify_extend"],
                                  verify_margin=math.inf if s["verify_margin"] is None else s["verify_margin"],
                                  recorded=self.recorded, on_step=self._record if self.resume else None,
                                  budget=self.budget)
        new_steps = selection.steps[len(self.recorded):]
        if new_steps and first_seconds:  # the dense pass taken before replaying is part of the selection's cost
            new_steps[0].seconds += first_seconds
            selection.passes += first_passes
        self.timings["selection"] = selection.seconds
        engine.release(traj)
        if self.budget is not None:
            engine.release(self.budget.holdout)
        return selection

    def _record(self, selection: Selection) -> None:
        if self.engine.parallel.is_main:
            write_state(self.resume, self.run_id, selection.steps)

    def compensate(self, view: View) -> CompensationResult:
        """Stage 2 of ``view`` (made the engine's live view); its folds become the live view's overrides."""
        engine, mode = self.engine, self.spec.settings["compensate"]
        engine.reset_view(view.copy())
        if mode == "none":
            return CompensationResult(mode="none")
        traj = engine.trajectory(self.windows)
        try:
            return compensate(traj, self.dense, mode=mode, ridge=self.spec.settings["ridge"])
        finally:
            engine.release(traj)


class _SavePoints(QualityBudget):
    """The quality budget that also keeps the view right after each removal count in ``points`` (``--save-at``)."""

    def __init__(self, holdout, max_increase, views: dict, points: set):
        self.views, self.points = views, points
        super().__init__(holdout, max_increase)

    def removed(self, orig: int) -> None:
        super().removed(orig)
        count = len(self.curve) - 1
        if count in self.points:
            self.views[count] = self.holdout.engine.view.copy()


def _stage(pipe: _Pipeline, view: View, with_pruned: bool) -> dict:
    """Compensate and evaluate one removal count's view: ``{"view", "compensation", "perplexity"}``."""
    ppl = {}
    if with_pruned:
        ppl["dense"] = pipe.evaluate(View(list(range(pipe.engine.n_layers))))
    ppl["pruned"] = pipe.evaluate(view)
    comp = pipe.compensate(view)
    if comp.mode != "none":
        ppl["compensated"] = pipe.evaluate()
    return {"view": pipe.engine.view.copy(), "compensation": comp,
            "perplexity": {k: v for k, v in ppl.items() if v is not None}}


def prune(model: nn.Module | str | os.PathLike, calibration: Calibration, *, num_layers: int | None = None,
          ratio: float | None = None, method: str = DEFAULT_METHOD, metric: str = DEFAULT_METRIC,
          compensate_mode: str = DEFAULT_COMPENSATION, ridge: float | None = None,
          protected: list[int] | tuple[int, ...] = (), micro_batch: int = 8, eval_tokens: torch.Tensor | None = None,
          eval_seqlen: int = 1024, eval_max_tokens: int | None = None, seed: int = 0, inplace: bool = False,
          backend: str = "hooks", progress: bool = False, resume: str | Path | None = None, verify_top: int | None = None,
          verify_windows: int | None = None, verify_margin: float | None = None, verify_extend: bool = False,
          folds: int | None = None, max_memory=None, device: str | torch.device | None = None,
          dtype: str | torch.dtype | None = None, holdout: Calibration | None = None,
          max_ppl_increase: float | None = None, save_at=(), measure_speed: bool = False) -> PruneResult:
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
        num_layers / ratio: how many layers to remove (exactly one, ratio rounds half up; with ``max_ppl_increase``
            they are a ceiling and may both be omitted).
        method: layer selection, one of :data:`gradmap.names.METHODS`.
        metric: stage-1 metric, one of :data:`gradmap.names.METRICS` (``method="gradmap"`` only).
        compensate_mode: one of :data:`gradmap.names.COMPENSATIONS`.
        ridge: relative ridge for stage 2 (``None``: searched by k-fold cross-validation on the calibration windows).
        protected: original layer indices never removed.
        micro_batch: calibration windows per forward/backward.
        eval_tokens: LongTensor ``[num_tokens]`` of test text; when given, PPL of the dense, pruned and compensated
            model is measured (``eval_seqlen`` tokens per window, first ``eval_max_tokens`` tokens).
        seed: seeds torch before the run (the calibration windows carry their own seed).
        inplace: with an ``nn.Module``, prune that model itself; by default it is left bit-identical.
        backend: ``"hooks"`` or ``"fused"`` weight-gradient reduction for the weight metrics.
        verify_top: ``method="gradmap"`` only: each decision removes, among the ``verify_top`` lowest-scored layers,
            the one whose removal gives the lowest calibration NLL (our extension; 0 = the paper's metric alone).
            ``None`` (default): 3 for GradMAP (:func:`gradmap.methods.gradmap.default_verify_top`), 0 for the
            baselines.
        verify_windows: the check runs on this many calibration windows (the first windows of micro-batches spread
            over the set, :func:`gradmap.methods.gradmap.verify_subset`; ``None``: the default rule; pass
            ``calibration.nsamples`` for all); ``verify_margin``: only candidates scored within ``(1 + margin)`` x the lowest score are
            checked (``None``: all ``verify_top``); ``verify_extend``: while the lowest NLL is the last checked
            layer's, the next ``verify_top`` layers by score are checked too (off by default: measured not to pay,
            docs/metric_selection.md) (:func:`gradmap.methods.gradmap.select_gradmap`).
        resume: path of a stage-1 state file (:mod:`gradmap.resume`): written after every decision (rank 0); if it
            already holds decisions of the same model, calibration and settings, they are replayed.
        folds: stage-2 cross-validation groups (default ``min(4, nsamples)``; needs ``2 <= folds <= nsamples``).
        max_memory: memory budget in accelerate's notation (``"20GiB"`` or ``{0: "70GiB", "cpu": "200GiB"}``) for a
            model given by path (:mod:`gradmap.engine.memory`).
        device, dtype: compute device and dtype for a model given by path (default: CUDA if available with
            bfloat16, else CPU with float32).
        holdout: held-out calibration windows, disjoint from ``calibration`` (:func:`gradmap.data.build_calibration`
            with ``exclude``): the removal curve (held-out PPL, parameters removed, tokens/s after every removal,
            :mod:`gradmap.methods.budget`) is recorded on them.
        max_ppl_increase: quality budget, percent: removal stops before the held-out PPL would exceed the dense
            model's by more than this (needs ``holdout``).
        save_at: removed-layer counts (≤ the target) at which the model is also kept, compensated and evaluated:
            :attr:`PruneResult.points` (``--save-at``).
        measure_speed: measure dense vs pruned prefill and decode tokens/s on the run's device
            (:func:`gradmap.speed.compare_speed`; resident runs only).

    Returns:
        :class:`PruneResult`.

    Raises:
        ValueError: unknown method, metric or compensation mode, a bad target (:func:`gradmap.validation.
            resolve_target`), calibration windows longer than the model's maximum, a model on the meta device or
            quantized, non-finite scores / Gram matrices, a ``resume`` file recorded for a different run, a run that
            cannot fit ``max_memory``, or options that do not apply (``max_memory``/``device`` with a module,
            ``max_ppl_increase`` without ``holdout``, ``save_at`` beyond the target).
    """
    start = time.perf_counter()
    parallel = DataParallel()
    spec = _check_arguments(model, calibration, num_layers=num_layers, ratio=ratio, method=method, metric=metric,
                            compensate_mode=compensate_mode, ridge=ridge, protected=protected, micro_batch=micro_batch,
                            eval_tokens=eval_tokens, eval_seqlen=eval_seqlen, verify_top=verify_top, folds=folds,
                            verify_windows=verify_windows, verify_margin=verify_margin, verify_extend=verify_extend,
                            max_memory=max_memory, device=device, dtype=dtype, inplace=inplace, resume=resume,
                            max_ppl_increase=max_ppl_increase, holdout=holdout, save_at=save_at, backend=backend)
    weights, tokenizer, source_path, plan = _open(model, calibration, spec, parallel=parallel, max_memory=max_memory,
                                                  device=device, dtype=dtype, eval_tokens=eval_tokens)
    torch.manual_seed(seed)
    settings = dict(spec.settings, seed=seed, eval_max_tokens=eval_max_tokens, device=str(weights.device),
                    dtype=str(weights.dtype).replace("torch.", ""), world_size=parallel.world_size)
    if source_path is not None:
        settings["model"] = str(model)
    recorded, run_id = [], None
    if resume is not None:
        decisions = {k: settings[k] for k in ("num_layers", "metric", "protected", "micro_batch", "backend", "seed",
                                              "verify_top", "folds", "dtype")}
        decisions.update({k: settings[k] for k in ("verify_windows", "verify_margin") if settings[k] is not None})
        if settings["verify_extend"]:
            decisions["verify_extend"] = True
        run_id = fingerprint(weights, calibration, decisions)
        recorded = load_state(resume, run_id)
        if recorded:
            logger.info("resuming from %s: %d of %d decisions recorded", resume, len(recorded), spec.target)
    eval_windows = None if eval_tokens is None else perplexity_windows(
        eval_tokens, seqlen=eval_seqlen, max_tokens=eval_max_tokens, micro_batch=4, max_length=spec.limits.max_length)
    with Engine(weights, parallel=parallel, progress=progress, stride=plan.stride if plan else 1,
                state_budget=plan.state_budget if plan else None,
                keep_graph=plan.keep_graph if plan else True) as engine:
        pipe = _Pipeline(engine, calibration, spec, eval_windows, holdout, resume, run_id, recorded)
        selection = pipe.select()
        final = engine.view.copy()
        points = {c: _stage(pipe, v, with_pruned=False) for c, v in sorted(pipe.views.items())
                  if c < len(selection.removed)}
        stage = _stage(pipe, final, with_pruned=True)
        pipe.timings["compensation"] = stage["compensation"].seconds
        if pipe.dense is not None:
            engine.release(pipe.dense)
    view = stage["view"]
    pruned = _materialize(model, weights, view, inplace)
    speed = _speed(weights, pruned, tokenizer) if measure_speed else None
    pipe.timings["total"] = time.perf_counter() - start
    lineage = _lineage(source_path)
    base = dict(selection=selection, settings=settings, calibration=dict(calibration.spec),
                memory=plan.as_dict() if plan else None, lineage=lineage, tokenizer=tokenizer, weights=weights,
                curve=pipe.budget.as_dict() if pipe.budget else None)
    result = _result(stage, len(selection.removed), pipe.timings, pruned, speed, **base)
    result.points = {c: _result(p, c, {}, None, None, **base) for c, p in points.items()}
    if result.curve is not None:
        for c, r in {**result.points, len(result.removed): result}.items():
            if "compensated" in r.perplexity or "pruned" in r.perplexity:
                result.curve.setdefault("test_ppl", {})[str(c)] = (r.perplexity.get("compensated")
                                                                   or r.perplexity["pruned"])["ppl"]
    return result


def _materialize(model, weights: ModelWeights, view: View, inplace: bool) -> nn.Module | None:
    """The pruned model as an ``nn.Module``: the caller's own (``inplace``), one sharing the dense tensors (resident
    runs), or ``None`` (streamed: save it instead)."""
    if isinstance(model, nn.Module) and inplace:
        prune_inplace(model, view, weights.adapter)
        return model
    if all(weights.is_live(u) for u in weights.placement):
        return materialize_pruned(weights, view)
    return None


def _speed(weights: ModelWeights, pruned: nn.Module | None, tokenizer) -> dict | None:
    """Dense vs pruned prefill/decode tokens/s on the run's device (resident runs; ``None`` when streamed)."""
    if pruned is None or not all(weights.is_live(u) for u in weights.placement):
        return None
    limit = getattr(weights.model.config, "max_position_embeddings", None) or 4096
    return compare_speed(weights.model, pruned, tokenizer if tokenizer is not None else weights.model.config.vocab_size,
                         device=weights.device, prompt_tokens=min(SPEED_PROMPT, limit // 2),
                         new_tokens=min(SPEED_NEW_TOKENS, limit // 4))


def _result(stage: dict, count: int, timings: dict, pruned, speed, *, selection: Selection, **common) -> PruneResult:
    """The :class:`PruneResult` of one removal count (the final one, or a save point)."""
    view = stage["view"]
    removed = list(selection.removed[:count])
    sub = Selection(removed=removed, steps=selection.steps[:count], method=selection.method, passes=selection.passes,
                    layer_scores=selection.layer_scores, extra=selection.extra)
    removed_original = kept_original = None
    if common.get("lineage"):
        base = common["lineage"][-1]["kept_layers_original"]
        kept_original = [base[i] for i in view.kept]
        removed_original = [base[i] for i in removed]
    return PruneResult(model=pruned, removed=removed, kept=list(view.kept), selection=sub,
                       compensation=stage["compensation"], perplexity=stage["perplexity"], timings=dict(timings),
                       view=view, speed=speed, removed_original=removed_original, kept_original=kept_original,
                       **common)
