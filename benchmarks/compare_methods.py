"""GradMAP against the layer-pruning baselines on the default model: one command, one process, the same data.

    python benchmarks/compare_methods.py                      # quick smoke settings (8x64), docs/compare/<model>/
    python benchmarks/compare_methods.py --full --model gemma3-270m   # the paper-like setting (see --full): hours

Every method of :data:`gradmap.methods.METHODS` (and GradMAP with ``--verify-top``, row ``gradmap-verify``) removes the same number of decoder layers (``--ratio``, 25 % = 8 of
SmolLM2's 30) using the SAME calibration windows (``--nsamples`` × ``--seqlen`` tokens of the Wikipedia calibration
split, seed ``--seed``). Each selection runs once; its pruned model is evaluated as is ("none") and after GradMAP's
stage 2 ("every-gap", :func:`gradmap.compensation.compensate`); GradMAP's selection also with the paper's own stage 2
("trained": an Adam-trained projection at the kept layer of largest mean shift, the paper-faithful variant); the
Gromov block also gets ReplaceMe's own closed-form compensation ("replaceme"). Evaluation: test-split perplexity
(first ``--eval-tokens`` tokens, ``--eval-seqlen`` per window) and zero-shot accuracy
(:func:`gradmap.zeroshot.evaluate_zero_shot`: the first ``--zeroshot-limit`` items of each task for the rows the
targets compare, :data:`TARGET_ROWS`, ``--zeroshot-limit-others`` for the rest; the stderr of every accuracy and of
the average is reported). Torch threads are fixed (``--threads``) for the whole run.

Columns: prune time = wall seconds of the layer selection (stage 1 for GradMAP; the method's scoring and removal for a
baseline); stage-2 time separately; forward-equivalent passes over the calibration set (a backward counts 2; the
leave-one-out searches resume each candidate from cached hidden states and count the share they run, see
:mod:`gradmap.methods` and :mod:`gradmap.prefix`); passes as published = one full forward per candidate, what
the SLEB / BlockPruner / PPL papers' own procedure spends; time ratio = the method's prune time / the default GradMAP
selection's (:func:`reference_method`; > 1: GradMAP is faster); peak memory =
peak heap bytes in use during the selection above the level before it (CPU: glibc ``mallinfo2`` in-use bytes,
``uordblks + hblkhd``, sampled every 2 ms by a thread, so a peak shorter than that can be missed; CUDA:
``torch.cuda.max_memory_allocated``); Spearman = rank correlation of the method's first-step layer scores with the
oracle (:mod:`gradmap.methods.fidelity`), the loss increase of removing each single layer measured on windows of the
TEST split (so no method has seen them; on the calibration windows PPL/SLEB would match the oracle by construction).

Reuse: each selection, each row's perplexity and each row's zero-shot result is cached as JSON under ``<out>/cache/``,
keyed by a hash of every setting that affects it (zero-shot separately, so more items can be added later without
recomputing the perplexity; the compensated model is rebuilt by re-running its deterministic stage 2); a rerun with
the same settings recomputes only what is missing (``--fresh`` ignores the cache). A pruned model is rebuilt from a cached selection (removed layers, BlockPruner's zeroed sub-blocks) without
re-running the method. Outputs in ``--out``: ``compare.csv``, ``compare.json`` (rows, dense model, oracle, settings,
environment, wall time), ``compare.md`` (table + summary) and ``compare.png``.
"""

from __future__ import annotations

import argparse
import csv
import ctypes
import hashlib
import importlib.metadata
import json
import logging
import math
import os
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gradmap import __version__  # noqa: E402
from gradmap.adapters import get_adapter  # noqa: E402
from gradmap.compensation import compensate  # noqa: E402
from gradmap.compensation.replaceme import REPLACEME_RIDGE  # noqa: E402
from gradmap.data import build_calibration, load_text, tokenize  # noqa: E402
from gradmap.engine import Engine, Windows  # noqa: E402
from gradmap.evaluation import perplexity_windows, view_perplexity  # noqa: E402
from gradmap.methods import Step, select_layers  # noqa: E402
from gradmap.methods.blockpruner import zeroed_output  # noqa: E402
from gradmap.methods.fidelity import oracle_loss_increase, spearman  # noqa: E402
from gradmap.methods.gradmap import default_verify_top, default_verify_windows  # noqa: E402
from gradmap.models import load_model  # noqa: E402
from gradmap.names import DEFAULT_METRIC, METHODS  # noqa: E402
from gradmap.removal import materialize_pruned  # noqa: E402
from gradmap.report import environment  # noqa: E402
from gradmap.validation import resolve_target  # noqa: E402
from gradmap.zeroshot import evaluate_zero_shot, parse_tasks  # noqa: E402

log = logging.getLogger("compare_methods")
MIB = 2**20
LABELS = {"gradmap": "GradMAP, metric only (paper)", "shortgpt": "ShortGPT (BI)", "gromov": "Gromov (angular)",
          "taylor-plus": "Shortened-LLaMA Taylor+", "ppl": "Shortened-LLaMA PPL", "sleb": "SLEB",
          "blockpruner": "BlockPruner", "gradmap-verify": "GradMAP (default: + loss check of its top K)"}
#: rows of this benchmark: every method of gradmap.methods (``gradmap`` = the paper's selection, the metric alone),
#: plus ``gradmap-verify``: GradMAP as it ships, the metric + the loss check of its top K (our extension)
ROWS = METHODS + ("gradmap-verify",)
#: (method, compensation) rows that the targets compare (dense, GradMAP as shipped, the paper-faithful GradMAP =
#: plain metric selection + the paper's trained projection, SLEB): they get ``--zeroshot-limit`` items per task
TARGET_ROWS = {("dense", "-"), ("gradmap", "every-gap"), ("gradmap", "trained"), ("gradmap-verify", "every-gap"),
               ("sleb", "none"), ("sleb", "every-gap")}
#: the row that ships: GradMAP as ``gradmap prune`` runs it by default (selection and stage 2)
DEFAULT_ROW = ("gradmap-verify", "every-gap")
COMP_LABELS = {"none": "none", "every-gap": "every-gap", "trained": "trained (paper)", "replaceme": "replaceme"}


def compensations(method: str) -> list[str]:
    """Stage-2 variants evaluated for a selection: none and every-gap for all; the paper's trained max-shift
    projection for GradMAP; ReplaceMe's own closed form for the Gromov block."""
    return (["none", "every-gap"] + (["trained"] if method == "gradmap" else [])
            + (["replaceme"] if method == "gromov" else []))


# ----------------------------------------------------------------------------------------------------------- memory
class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]


class PeakMemory:
    """``with PeakMemory(device) as p: ...`` then ``p.peak_bytes``: peak bytes in use above the start level.

    CPU: glibc ``mallinfo2()`` (heap bytes handed out by malloc, all arenas, plus mmapped blocks) sampled by a thread
    every ``interval`` seconds; ``None`` when glibc has no ``mallinfo2``. CUDA: ``torch.cuda.max_memory_allocated``.
    """

    def __init__(self, device: torch.device, interval: float = 0.002):
        self.device, self.interval, self.peak_bytes = device, interval, None
        self._fn = None
        if device.type == "cpu":
            try:
                self._fn = ctypes.CDLL("libc.so.6").mallinfo2
                self._fn.restype = _MallInfo2
            except (OSError, AttributeError):
                self._fn = None

    def _in_use(self) -> int:
        info = self._fn()
        return int(info.uordblks + info.hblkhd)

    def _sample(self):
        while not self._stop.is_set():
            self._max = max(self._max, self._in_use())
            self._stop.wait(self.interval)

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        elif self._fn is not None:
            self._base = self._max = self._in_use()
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._base
        elif self._fn is not None:
            self._stop.set()
            self._thread.join()
            self.peak_bytes = max(self._max, self._in_use()) - self._base


# ------------------------------------------------------------------------------------------------------------ cache
class Cache:
    """JSON records under ``<out>/cache/<kind>-<hash>.json``; ``fresh`` ignores what is there (and overwrites)."""

    def __init__(self, root: Path, fresh: bool):
        self.root, self.fresh = root / "cache", fresh
        self.root.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def key(settings: dict) -> str:
        return hashlib.sha1(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def path(self, kind: str, settings: dict) -> Path:
        return self.root / f"{kind}-{self.key(settings)}.json"

    def get(self, kind: str, settings: dict):
        p = self.path(kind, settings)
        if self.fresh or not p.is_file():
            return None
        return json.loads(p.read_text())

    def put(self, kind: str, settings: dict, record: dict) -> dict:
        p = self.path(kind, settings)
        tmp = p.with_suffix(".tmp")
        tmp.write_text(json.dumps(dict(record, settings=settings), indent=1, default=str))
        tmp.replace(p)
        return record


# ------------------------------------------------------------------------------------------------------- the steps
def open_engine(model, calibration, args):
    """An engine over the dense ``model`` and the calibration trajectory (stage-2 cross-validation groups)."""
    engine = Engine.for_module(model, progress=not args.quiet)
    groups = min(4, calibration.nsamples)
    return engine, engine.trajectory(Windows.from_calibration(calibration, args.micro_batch, groups=groups))


#: iterative methods whose decisions are saved after each step (``<out>/cache/partial-<hash>.json``): an interrupted
#: selection resumes from its last decision (a long SLEB search can span several runs)
RESUMABLE = ("gradmap", "gradmap-verify", "sleb")


def _merge_extra(before: dict, after: dict) -> dict:
    """A resumed selection's ``extra``: list values (per-step records) concatenated, the rest from the later part."""
    out = dict(before)
    for k, v in after.items():
        out[k] = before.get(k, []) + v if isinstance(v, list) and isinstance(before.get(k), list) else v
    return out


def run_selection(model, calibration, target, method, args, partial: Path | None = None) -> dict:
    """Select on the engine's view of the dense ``model`` (never modified); return the record.

    ``partial`` (iterative methods, :data:`RESUMABLE`): the file that holds the decisions made so far; they are
    replayed without scoring, new ones are appended after every step, and the recorded wall seconds and passes are
    added to this run's (the replay costs one extra forward of the calibration set, counted)."""
    device = next(model.parameters()).device
    load_before = os.getloadavg()[0]
    state = json.loads(partial.read_text()) if partial is not None and partial.is_file() else None
    recorded = [Step(d["step"], {int(k): v for k, v in d["scores"].items()}, d["removed"], d["seconds"])
                for d in state["steps"]] if state else []
    prior = state or {"seconds": 0.0, "passes": 0.0, "extra": {}, "runs": 0}
    if recorded:
        log.info("%s: resuming after %d recorded decisions (%.0f s, %.2f passes)", method, len(recorded),
                 prior["seconds"], prior["passes"])
    engine, traj = open_engine(model, calibration, args)
    try:
        with PeakMemory(device) as mem:
            t0 = time.perf_counter()
            verify = ({"method": "gradmap", "verify_top": args.verify_top, "verify_windows": args.verify_windows,
                       "verify_margin": args.verify_margin, "verify_extend": args.verify_extend}
                      if method == "gradmap-verify" else {"method": method})
            if partial is not None:
                def save(sel):
                    record = {"steps": [{"step": st.step, "scores": {str(k): v for k, v in st.scores.items()},
                                         "removed": st.removed, "seconds": st.seconds} for st in sel.steps],
                              "seconds": prior["seconds"] + time.perf_counter() - t0,
                              "passes": prior["passes"] + sel.passes, "extra": _merge_extra(prior["extra"], sel.extra),
                              "runs": prior["runs"] + 1}
                    tmp = partial.with_suffix(".tmp")
                    tmp.write_text(json.dumps(record, default=str))
                    tmp.replace(partial)

                verify.update(recorded=recorded, on_step=save)
            sel = select_layers(traj, target, **verify, metric=args.metric)
            seconds = time.perf_counter() - t0
        if recorded:
            seconds += prior["seconds"]
            sel.passes += prior["passes"]
            sel.extra = _merge_extra(prior["extra"], sel.extra)
            sel.extra["resumed_runs"] = prior["runs"] + 1
        kept = list(engine.view.kept)
        removed_params = sum(engine.layer_params[i] for i in range(engine.n_layers) if i not in set(kept))
    finally:
        engine.close()
    # what the published algorithm would spend: one FULL forward per candidate (our searches resume from cached states)
    if method in ("sleb", "blockpruner"):
        published = sum(len(step.scores) for step in sel.steps)
    elif method == "ppl":
        published = len(sel.steps[0].scores)
    else:
        published = sel.passes
    record = {"method": method, "removed": sorted(sel.removed), "removal_order": list(sel.removed), "kept": kept,
              "seconds": seconds, "step_seconds": sel.seconds, "passes": sel.passes, "published_passes": published,
              "peak_bytes": mem.peak_bytes, "removed_params": removed_params,
              "zeroed_params": sel.extra.get("zeroed_params", 0),
              "zeroed_sub_blocks": sel.extra.get("zeroed_sub_blocks", []),
              "load_avg_1min": [load_before, os.getloadavg()[0]],  # machine load before/after: other jobs skew time
              "first_step_layer_scores": {str(k): v for k, v in sel.first_layer_scores().items()},
              "step_scores": [{str(k): v for k, v in step.scores.items()} for step in sel.steps],
              "extra": sel.extra}
    log.info("%s: removed %s in %.1f s (%g passes)", method, record["removed"], seconds, sel.passes)
    return record


def pruned_session(model, calibration, record: dict, args):
    """``(engine, trajectory, dense snapshot)`` with the view of a (cached) selection: its layers removed,
    BlockPruner's lone sub-blocks zeroed (overrides)."""
    engine, traj = open_engine(model, calibration, args)
    traj.forward()
    dense = traj.snapshot()
    layers = get_adapter(model).layers(model)
    for label in record["zeroed_sub_blocks"]:
        layer, kind = label.split(".")
        engine.set_overrides(int(layer), zeroed_output(layers[int(layer)], kind))
    for orig in record["removed"]:
        engine.remove(orig)
    return engine, traj, dense


def evaluate_ppl(engine, eval_ids, args) -> dict:
    """Test PPL of the engine's live view: ``{"ppl": {...}, "eval_seconds": s}``."""
    t0 = time.perf_counter()
    windows = perplexity_windows(eval_ids, seqlen=args.eval_seqlen, max_tokens=args.eval_tokens or None,
                                 max_length=getattr(engine.config, "max_position_embeddings", None))
    ppl = view_perplexity(engine, windows, seqlen=args.eval_seqlen, stride=args.eval_seqlen).as_dict()
    return {"ppl": ppl, "eval_seconds": time.perf_counter() - t0}


def evaluate_zs(engine, tokenizer, limit: int, args, cache: "Cache", key: dict) -> dict:
    """Zero-shot accuracy of the materialised live view, first ``limit`` items per task (0: all items).

    Resumable per task: each task's result is cached as ``zeroshot-task`` under ``key`` + the task name, so a run
    stopped inside a row (a 500-item row takes tens of minutes on a CPU) restarts at the first unfinished task. The
    merged record (``average``: the mean of the tasks' headline metrics, as :class:`gradmap.zeroshot.ZeroShotResult`)
    is cached as ``zeroshot`` under ``key`` and returned; the per-task records are removed after that write.
    """
    pruned = materialize_pruned(engine.weights, engine.view)
    tasks = parse_tasks(args.tasks)
    parts, t0 = {}, time.perf_counter()
    for n, task in enumerate(tasks, 1):
        task_key = dict(key, task=task)
        part = cache.get("zeroshot-task", task_key)
        if part is None:
            part = cache.put("zeroshot-task", task_key, evaluate_zero_shot(
                pruned, tokenizer, [task], limit=limit or None, batch_size=args.zeroshot_batch_size).as_dict())
            log.info("  zero-shot %d/%d %s: %s %.4f on %d items, %.0f s (row %.0f s so far)", n, len(tasks), task,
                     part["tasks"][task]["headline"], part["tasks"][task][part["tasks"][task]["headline"]],
                     part["tasks"][task]["n"], part["tasks"][task]["seconds"], time.perf_counter() - t0)
        parts[task] = part
    first = parts[tasks[0]]
    merged = {"tasks": {t: parts[t]["tasks"][t] for t in tasks},
              "average": sum(parts[t]["tasks"][t][parts[t]["tasks"][t]["headline"]] for t in tasks) / len(tasks),
              "limit": first["limit"], "seconds": sum(p["seconds"] for p in parts.values()),
              "versions": first["versions"], "scorer": first.get("scorer")}
    cache.put("zeroshot", key, merged)
    for task in tasks:
        cache.path("zeroshot-task", dict(key, task=task)).unlink(missing_ok=True)
    return merged


def zs_average_stderr(zs: dict) -> float | None:
    """Standard error of the zero-shot average (mean of the tasks' headline metrics, tasks independent):
    ``sqrt(Σ se_t²) / n_tasks``, with ``se_t`` lm-eval's bootstrap-free binomial stderr of task t."""
    ses = [t.get(f"{t['headline']}_stderr") for t in zs["tasks"].values()]
    if not ses or any(v is None for v in ses):
        return None
    return math.sqrt(sum(v * v for v in ses)) / len(ses)


def zs_limit_of(method: str, comp: str, args) -> int:
    """Items per task for a row: ``--zeroshot-limit`` for the rows the targets compare, else
    ``--zeroshot-limit-others`` (-1: no zero-shot, 0: all items)."""
    return args.zeroshot_limit if (method, comp) in TARGET_ROWS else args.zeroshot_limit_others


# ------------------------------------------------------------------------------------------------------------ output
def table_rows(rows: list[dict], dense: dict) -> list[dict]:
    """Flat rows for CSV / markdown: one per (method, compensation), plus the dense model first."""
    ref = reference_method(rows)
    base = [r for r in rows if r["method"] == ref and r["compensation"] == "none"]
    g_sec = base[0]["prune_seconds"] if base else None
    flat = [{"method": "dense", "compensation": "-", "removed_layers": "", "prune_s": "", "stage2_s": "",
             "passes": "", "published_passes": "", "time_ratio_vs_gradmap": "", "peak_mib": "", "removed_params": 0,
             "zeroed_params": 0,
             "test_ppl": dense["ppl"]["ppl"], **_zs_columns(dense), "spearman_vs_oracle": "",
             **_task_columns(dense)}]
    for r in rows:
        flat.append({
            "method": r["method"], "compensation": r["compensation"],
            "removed_layers": " ".join(str(i) for i in r["removed"]),
            "prune_s": r["prune_seconds"], "stage2_s": r["stage2_seconds"], "passes": r["passes"],
            "published_passes": r.get("published_passes", ""),
            "time_ratio_vs_gradmap": r["prune_seconds"] / g_sec if g_sec else "",
            "peak_mib": r["peak_bytes"] / MIB if r["peak_bytes"] is not None else "",
            "removed_params": r["removed_params"], "zeroed_params": r["zeroed_params"],
            "test_ppl": r["ppl"]["ppl"], **_zs_columns(r), "spearman_vs_oracle": r["spearman"],
            **_task_columns(r)})
    return flat


def _zs_columns(r: dict) -> dict:
    """Zero-shot average, its stderr and the items per task (largest task count) of a row; empty without zero-shot."""
    zs = r.get("zeroshot")
    if not zs:
        return {"zeroshot_avg": None, "zeroshot_avg_stderr": None, "zeroshot_items": None}
    return {"zeroshot_avg": zs["average"], "zeroshot_avg_stderr": zs_average_stderr(zs),
            "zeroshot_items": max(t["n"] for t in zs["tasks"].values())}


def _task_columns(r: dict) -> dict:
    zs = r.get("zeroshot")
    if not zs:
        return {}
    out = {}
    for t, v in zs["tasks"].items():
        out[f"zs_{t}"] = v[v["headline"]]
        out[f"zs_{t}_stderr"] = v.get(f"{v['headline']}_stderr")
    return out


def _fmt(v, digits=2):
    if v is None or v == "":
        return ""
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return f"{v:.{digits}f}"
    return str(v)


def _items(limit: int) -> str:
    return "no" if limit < 0 else ("all" if limit == 0 else f"the first {limit}")


def write_markdown(path: Path, flat: list[dict], summary: list[str], settings: dict, wall: float,
                   recorded: float = 0.0) -> None:
    cols = [("method", "method", None), ("compensation", "comp.", None),
            ("removed_layers", "removed (orig. idx)", None),
            ("prune_s", "prune s", 1), ("stage2_s", "stage 2 s", 1), ("passes", "fwd-eq. passes", 0),
            ("published_passes", "passes as published", 0),
            ("time_ratio_vs_gradmap", "time / GradMAP", 2), ("peak_mib", "peak MiB", 0),
            ("test_ppl", "test PPL", 2), ("zeroshot_avg", "0-shot avg ± se", "pm"),
            ("zeroshot_items", "items/task", 0), ("spearman_vs_oracle", "Spearman", 2)]
    tasks = list(dict.fromkeys(k for r in flat for k in r if k.startswith("zs_") and not k.endswith("_stderr")))
    cols += [(t, t[3:], "pm") for t in tasks]
    lines = ["# GradMAP vs layer-pruning baselines", "",
             f"Model `{settings['model']}`, {settings['target']} of {settings['num_layers']} decoder layers removed; "
             f"calibration {settings['nsamples']}×{settings['seqlen']} tokens (seed {settings['seed']}), the same "
             f"windows for every method; test PPL on {settings['eval_tokens'] or 'all'} test-split tokens "
             f"(seqlen {settings['eval_seqlen']}); zero-shot: {_items(settings['zeroshot_limit'])} items per "
             f"task for the rows the targets compare, {_items(settings['zeroshot_limit_others'])} for the others "
             "(all where a split is smaller; `items/task` = the largest task's count; ± = standard error); "
             f"torch threads {settings['threads']}. Whole run (this invocation): {wall:.0f} s; compute recorded in "
             f"the rows (selections, stage 2, evaluations, oracle; cached rows included): {recorded:.0f} s. "
             f"`gradmap-verify` = GradMAP with `--verify-top {settings.get('verify_top')}`"
             + (f" checked on {settings['verify_windows']} of the {settings['nsamples']} windows"
                if settings.get("verify_windows") else "")
             + (f", margin {settings['verify_margin']}" if settings.get("verify_margin", math.inf) != math.inf else "")
             + (", extended by K more while the best is the last checked" if settings.get("verify_extend") else "")
             + "; `trained` = the paper's stage 2 (an Adam-trained projection at the kept layer of largest mean "
             "shift).",
             "",
             "| " + " | ".join(c[1] for c in cols) + " |", "|" + "---|" * len(cols)]
    def cell(r, k, d):
        if d == "pm":
            v, se = r.get(k), r.get(k + "_stderr") if k != "zeroshot_avg" else r.get("zeroshot_avg_stderr")
            return "" if v is None else (f"{v:.3f} ± {se:.3f}" if se is not None else f"{v:.3f}")
        return _fmt(r.get(k), d if d is not None else 2)

    for r in flat:
        lines.append("| " + " | ".join(cell(r, k, d) for k, _, d in cols) + " |")
    lines += ["", "BlockPruner removes attention/MLP sub-blocks: layers with both gone are dropped; "
              "the rest are zeroed in place (their parameters stay in the checkpoint, `zeroed_params` in the CSV).",
              "", "## Summary", ""] + [f"- {s}" for s in summary]
    path.write_text("\n".join(lines) + "\n")


def plot(path: Path, rows: list[dict], dense: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.8), dpi=110)
    marks = {"none": "o", "every-gap": "^", "trained": "D", "replaceme": "s"}
    colors = {m: plt.get_cmap("tab10")(i) for i, m in enumerate(ROWS)}
    for r in rows:
        a.scatter(r["prune_seconds"], r["ppl"]["ppl"], marker=marks[r["compensation"]], color=colors[r["method"]],
                  s=60, label=f"{LABELS[r['method']]} / {r['compensation']}")
        if r.get("zeroshot"):
            b.scatter(r["ppl"]["ppl"], r["zeroshot"]["average"], marker=marks[r["compensation"]],
                      color=colors[r["method"]], s=60)
    a.axhline(dense["ppl"]["ppl"], color="gray", ls="--", lw=1, label="dense")
    a.set_xscale("log")
    a.set_yscale("log")
    a.set_xlabel("layer-selection wall time (s, log)")
    a.set_ylabel("test perplexity (log)")
    a.set_title("cost vs perplexity (o none, ^ every-gap, D trained, s ReplaceMe)")
    a.grid(alpha=0.3, which="both")
    a.legend(fontsize=6, ncol=2)
    if dense.get("zeroshot"):
        b.axhline(dense["zeroshot"]["average"], color="gray", ls="--", lw=1)
    b.set_xscale("log")
    b.set_xlabel("test perplexity (log)")
    b.set_ylabel("zero-shot average accuracy")
    b.set_title("perplexity vs zero-shot (dashed: dense)")
    b.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def reference_method(rows: list[dict]) -> str:
    """The selection the time ratios are taken against: the shipped default's (:data:`DEFAULT_ROW`) when it is among
    the rows, else the paper's GradMAP selection."""
    return DEFAULT_ROW[0] if any(r["method"] == DEFAULT_ROW[0] for r in rows) else "gradmap"


def summarize(rows: list[dict]) -> list[str]:
    """The comparisons the issue asks for, as sentences computed from the rows."""
    by = {(r["method"], r["compensation"]): r for r in rows}
    out = []
    ref = reference_method(rows)
    g = by.get((ref, "none"))
    if g:
        ratios = [f"{LABELS[m]} {by[(m, 'none')]['prune_seconds'] / g['prune_seconds']:.2f}x"
                  for m in ROWS if m != ref and (m, "none") in by]
        out.append(f"Layer-selection time relative to {LABELS[ref]} (> 1: it is faster): " + ", ".join(ratios) + ".")
        by_pass = []
        for m in ROWS:
            r = by.get((m, "none"))
            if m == ref or r is None:
                continue
            text = f"{LABELS[m]} {r['passes'] / g['passes']:.2f}x"
            if r.get("published_passes", r["passes"]) != r["passes"]:
                text += f" (full forwards as published: {r['published_passes'] / g['passes']:.2f}x)"
            by_pass.append(text)
        out.append(f"Forward-equivalent passes relative to {LABELS[ref]} (load-independent): " + ", ".join(by_pass)
                   + ".")
    for comp in ("none", "every-gap"):
        others = [r for (m, c), r in by.items() if not m.startswith("gradmap") and c == comp]
        for name in ("gradmap", "gradmap-verify"):
            g = by.get((name, comp))
            if not (g and others):
                continue
            best_ppl = min(others, key=lambda r: r["ppl"]["ppl"])
            line = (f"compensation {comp}: {LABELS[name]} test PPL {g['ppl']['ppl']:.2f} vs best baseline "
                    f"{LABELS[best_ppl['method']]} {best_ppl['ppl']['ppl']:.2f}")
            zs = [r for r in others if r.get("zeroshot")]
            if g.get("zeroshot") and zs:
                best_zs = max(zs, key=lambda r: r["zeroshot"]["average"])
                line += (f"; zero-shot average {g['zeroshot']['average']:.3f} vs best baseline "
                         f"{LABELS[best_zs['method']]} {best_zs['zeroshot']['average']:.3f}")
            out.append(line + ".")
    gains = []
    for m in ROWS:
        if (m, "none") in by and (m, "every-gap") in by:
            a, b = by[(m, "none")]["ppl"]["ppl"], by[(m, "every-gap")]["ppl"]["ppl"]
            gains.append(f"{LABELS[m]} {a:.2f} → {b:.2f} ({100 * (b - a) / a:+.1f} %)")
    if gains:
        out.append("Stage 2 (every-gap) effect on test PPL: " + "; ".join(gains) + ".")
    out += target_check(rows)
    out += [f"(paper's selection) {line}" for line in target_check(rows, ("gradmap", "every-gap"))]
    if ("gromov", "replaceme") in by:
        out.append(f"ReplaceMe (Gromov block + closed-form T): test PPL {by[('gromov', 'replaceme')]['ppl']['ppl']:.2f}.")
    fid = [f"{LABELS[r['method']]} {r['spearman']:.2f}" for r in rows if r["compensation"] == "none"]
    out.append("Spearman correlation of first-step scores with the oracle: " + ", ".join(fid) + ".")
    return out


def target_check(rows: list[dict], row: tuple[str, str] = DEFAULT_ROW) -> list[str]:
    """Issue 13's targets, computed from the rows: the shipped GradMAP row (``row``, :data:`DEFAULT_ROW`) must reach a
    test PPL <= the best SLEB row's (any compensation), with a selection time ratio SLEB / GradMAP >= 4, and a zero-shot
    average not below the best SLEB zero-shot average by more than one standard error of the difference
    (``sqrt(se_gradmap² + se_sleb²)``)."""
    by = {(r["method"], r["compensation"]): r for r in rows}
    g = by.get(row)
    sleb = [r for r in rows if r["method"] == "sleb"]
    if g is None or not sleb:
        return []
    best = min(sleb, key=lambda r: r["ppl"]["ppl"])
    ratio = sleb[0]["prune_seconds"] / g["prune_seconds"]
    name = f"{LABELS[g['method']]} / {COMP_LABELS[g['compensation']]}"
    out = [f"Target PPL: {name} {g['ppl']['ppl']:.2f} vs best SLEB ({best['compensation']}) {best['ppl']['ppl']:.2f}: "
           f"{'PASS' if g['ppl']['ppl'] <= best['ppl']['ppl'] else 'FAIL'}.",
           f"Target speed: SLEB / GradMAP selection time {ratio:.2f}x (>= 4 required, 6 the goal): "
           f"{'PASS' if ratio >= 4 else 'FAIL'}."]
    zs = [r for r in sleb if r.get("zeroshot")]
    if g.get("zeroshot") and zs:
        s = max(zs, key=lambda r: r["zeroshot"]["average"])
        se_g, se_s = zs_average_stderr(g["zeroshot"]), zs_average_stderr(s["zeroshot"])
        diff = g["zeroshot"]["average"] - s["zeroshot"]["average"]
        se = math.sqrt(se_g ** 2 + se_s ** 2) if se_g is not None and se_s is not None else float("nan")
        out.append(f"Target zero-shot: {name} {g['zeroshot']['average']:.3f} ± {se_g:.3f} vs best SLEB "
                   f"({s['compensation']}) {s['zeroshot']['average']:.3f} ± {se_s:.3f}: difference {diff:+.3f}, "
                   f"one stderr of the difference {se:.3f}: {'PASS' if diff >= -se else 'FAIL'}.")
    return out


# -------------------------------------------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="default", help="model directory or 'default' (SmolLM2-135M)")
    p.add_argument("--methods", default=",".join(ROWS), help="comma-separated subset of " + ", ".join(ROWS))
    p.add_argument("--verify-top", type=int, default=None,
                   help="K of the gradmap-verify row (GradMAP + loss check of its K lowest-scored layers; default 3, "
                        "as gradmap prune)")
    p.add_argument("--verify-windows", type=int, default=None,
                   help="calibration windows the gradmap-verify row's loss check runs on (default: as gradmap prune, "
                        "gradmap.methods.gradmap.default_verify_windows)")
    p.add_argument("--verify-extend", action="store_true",
                   help="gradmap-verify: while the lowest loss is the last checked layer's, check the next K too "
                        "(default off, as gradmap prune)")
    p.add_argument("--verify-margin", type=float, default=math.inf,
                   help="gradmap-verify: check only candidates scored within (1 + margin) x the lowest "
                   "(default: all K)")
    p.add_argument("--ratio", type=float, default=0.25, help="fraction of decoder layers to remove (default 0.25)")
    p.add_argument("--nsamples", type=int, default=None, help="calibration windows (default 8; --full 32)")
    p.add_argument("--seqlen", type=int, default=None, help="tokens per calibration window (default 64; --full 256)")
    p.add_argument("--seed", type=int, default=0, help="calibration sampling seed (default 0)")
    p.add_argument("--micro-batch", type=int, default=8, help="windows per forward/backward (default 8)")
    p.add_argument("--metric", default=None, help="GradMAP stage-1 metric (default: gradmap.DEFAULT_METRIC)")
    p.add_argument("--eval-tokens", type=int, default=None,
                   help="test-split tokens for PPL (default 8192; --full 32768; 0 = all)")
    p.add_argument("--eval-seqlen", type=int, default=1024, help="PPL window (default 1024)")
    p.add_argument("--zeroshot-limit", type=int, default=None,
                   help="items per zero-shot task for the rows the targets compare (dense, GradMAP every-gap, "
                   "GradMAP trained, GradMAP + loss check every-gap, SLEB) (default 20; --full 500; 0 = all items; "
                   "-1 = skip)")
    p.add_argument("--zeroshot-limit-others", type=int, default=None,
                   help="items per zero-shot task for every other row (default: as --zeroshot-limit; --full 100)")
    p.add_argument("--zeroshot-batch-size", type=int, default=8)
    p.add_argument("--tasks", default="all", help="zero-shot tasks (default all seven)")
    p.add_argument("--oracle-nsamples", type=int, default=None, help="oracle windows from the test split "
                   "(default: as --nsamples), --seqlen tokens each")
    p.add_argument("--replaceme-ridge", type=float, default=None,
                   help="ReplaceMe's relative ridge (default gradmap.methods.replaceme.REPLACEME_RIDGE)")
    p.add_argument("--threads", type=int, default=2, help="torch threads for the whole run (default 2)")
    p.add_argument("--full", action="store_true", help="paper-like settings: 32x256 calibration, 32768 test tokens, "
                   "500 zero-shot items per task for the target rows and 100 for the others (hours on CPU)")
    p.add_argument("--out", default=None, help="output directory (default docs/compare/<model name>)")
    p.add_argument("--fresh", action="store_true", help="ignore cached rows and recompute everything")
    p.add_argument("--selections-only", action="store_true",
                   help="run (and cache) the missing layer selections only; evaluate the rows in a later run")
    p.add_argument("--report-only", action="store_true",
                   help="compute nothing: write the outputs from the cached rows (a partial table if rows are missing)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    defaults = {"nsamples": (8, 32), "seqlen": (64, 256), "eval_tokens": (8192, 32768), "zeroshot_limit": (20, 500),
                "zeroshot_limit_others": (None, 100)}
    for name, (quick, full) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, full if args.full else quick)
    if args.metric is None:
        args.metric = DEFAULT_METRIC
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in args.methods if m not in ROWS]
    if bad:
        p.error(f"--methods: unknown {bad}; accepted: {', '.join(ROWS)}")
    if args.verify_top is not None and args.verify_top < 2:
        p.error(f"--verify-top: must be >= 2 (1 is plain GradMAP), got {args.verify_top}")
    if args.verify_windows is None:
        args.verify_windows = default_verify_windows(args.nsamples, args.seqlen)
    if not 1 <= args.verify_windows <= args.nsamples:
        p.error(f"--verify-windows: need 1 <= --verify-windows <= --nsamples={args.nsamples}, got {args.verify_windows}")
    if args.verify_windows == args.nsamples:
        args.verify_windows = None  # all windows (the cache keys of checks on the whole set carry no window count)
    args.oracle_nsamples = args.oracle_nsamples or args.nsamples
    if args.out is None:
        args.out = str(ROOT / "docs" / "compare" / ("smollm2-135m" if args.model == "default" else
                                                     Path(args.model).name.removesuffix(".gguf")))
    if args.zeroshot_limit_others is None:
        args.zeroshot_limit_others = args.zeroshot_limit
    for flag, value in (("--zeroshot-limit", args.zeroshot_limit),
                        ("--zeroshot-limit-others", args.zeroshot_limit_others)):
        if value < -1:
            p.error(f"{flag}: must be -1 (skip), 0 (all items) or a positive item count, got {value}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cache = Cache(out, args.fresh)
    start = time.perf_counter()

    model, tokenizer = load_model(args.model)
    model.eval()
    n_layers = len(get_adapter(model).layers(model))
    target = resolve_target(n_layers, ratio=args.ratio)
    if args.verify_top is None:
        args.verify_top = default_verify_top(n_layers)  # as gradmap prune
    max_len = getattr(model.config, "max_position_embeddings", None)
    calibration = build_calibration(tokenizer, load_text("wiki", "calibration"), nsamples=args.nsamples,
                                    seqlen=args.seqlen, seed=args.seed, max_length=max_len)
    test_text = load_text("wiki", "test")
    eval_ids = tokenize(tokenizer, test_text)
    oracle_windows = build_calibration(tokenizer, test_text, nsamples=args.oracle_nsamples, seqlen=args.seqlen,
                                       seed=args.seed + 1, source="wiki-test", max_length=max_len)
    base = {"model": args.model, "gradmap": __version__, "cost_model": "engine", "num_layers": n_layers,
            "target": target,
            "calibration": calibration.spec, "micro_batch": args.micro_batch, "threads": args.threads}
    eval_settings = {"eval_tokens": args.eval_tokens, "eval_seqlen": args.eval_seqlen}

    dense_key = dict(base, row="dense", **eval_settings)
    dense = cache.get("dense", dense_key)
    if args.report_only and (dense is None or cache.get("oracle", dict(base, row="oracle",
                                                                       windows=oracle_windows.spec)) is None):
        raise SystemExit("--report-only: the dense row or the oracle is not cached yet; nothing to report")
    dense_zs_key = dict(dense_key, zeroshot_limit=args.zeroshot_limit, tasks=args.tasks)
    dense_zs = cache.get("zeroshot", dense_zs_key) if args.zeroshot_limit >= 0 else None
    if not args.report_only and (dense is None or (args.zeroshot_limit >= 0 and dense_zs is None)):
        log.info("evaluating the dense model")
        with Engine.for_module(model) as engine:
            if dense is None:
                dense = cache.put("dense", dense_key, evaluate_ppl(engine, eval_ids, args))
            if args.zeroshot_limit >= 0 and dense_zs is None:
                dense_zs = evaluate_zs(engine, tokenizer, args.zeroshot_limit, args, cache, dense_zs_key)
    dense = dict(dense, zeroshot=dense_zs) if dense_zs else dense
    oracle_key = dict(base, row="oracle", windows=oracle_windows.spec)
    oracle = cache.get("oracle", oracle_key)
    if oracle is None:
        log.info("oracle: loss increase of removing each layer on %d test windows", oracle_windows.nsamples)
        engine, oracle_traj = open_engine(model, oracle_windows, args)
        with engine:
            oracle = oracle_loss_increase(oracle_traj)
        oracle = cache.put("oracle", oracle_key, {**oracle, "increase": {str(k): v for k, v in
                                                                           oracle["increase"].items()}})
    oracle_inc = {int(k): v for k, v in oracle["increase"].items()}

    settings = dict(base, nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed, metric=args.metric,
                    verify_top=args.verify_top, verify_windows=args.verify_windows, verify_margin=args.verify_margin,
                    verify_extend=args.verify_extend,
                    replaceme_ridge=args.replaceme_ridge or REPLACEME_RIDGE, oracle_windows=oracle_windows.spec,
                    zeroshot_limit=args.zeroshot_limit, zeroshot_limit_others=args.zeroshot_limit_others,
                    target_rows=sorted(TARGET_ROWS), **eval_settings)
    expected = sum(len(compensations(m)) for m in args.methods)
    rows = []
    pending: list[str] = []
    done = 0
    for method in args.methods:
        sel_key = dict(base, method=method, metric=args.metric if method.startswith("gradmap") else None)
        if method == "gradmap-verify":
            sel_key["verify_top"] = args.verify_top
            if args.verify_windows is not None or args.verify_margin != math.inf:
                sel_key.update(verify_windows=args.verify_windows, verify_margin=args.verify_margin)
            if args.verify_extend:
                sel_key["verify_extend"] = True
        comps = compensations(method)
        row_keys = {c: dict(sel_key, compensation=c, **eval_settings,
                            ridge=(args.replaceme_ridge or REPLACEME_RIDGE) if c == "replaceme" else None)
                    for c in comps}
        limits = {c: zs_limit_of(method, c, args) for c in comps}
        zs_keys = {c: dict(row_keys[c], zeroshot_limit=limits[c], tasks=args.tasks) for c in comps}
        cached_rows = {c: cache.get("row", k) for c, k in row_keys.items()}
        cached_zs = {c: cache.get("zeroshot", zs_keys[c]) if limits[c] >= 0 else None for c in comps}
        missing = [c for c in comps if cached_rows[c] is None or (limits[c] >= 0 and cached_zs[c] is None)]
        sel = cache.get("selection", sel_key)
        if not missing or args.report_only:
            for c in comps:
                if cached_rows[c] is not None:
                    rows.append(dict(cached_rows[c], zeroshot=cached_zs[c]) if cached_zs[c] else cached_rows[c])
            if args.report_only and missing:
                what = "rows not evaluated yet" if sel is not None else "selection not run yet"
                pending.append(f"{LABELS[method]}: {what} ({', '.join(missing)} missing)")
            done += len(comps)
            continue
        if sel is None:
            log.info("[%d/%d rows, %.0f min] selection: %s", done, expected, (time.perf_counter() - start) / 60,
                     method)
            partial = cache.path("partial", sel_key) if method in RESUMABLE else None
            sel = cache.put("selection", sel_key, run_selection(model, calibration, target, method, args, partial))
            if partial is not None:
                partial.unlink(missing_ok=True)
        if args.selections_only:
            rows += [dict(cached_rows[c], zeroshot=cached_zs[c]) if cached_zs[c] else cached_rows[c]
                     for c in comps if cached_rows[c] is not None]
            pending.append(f"{LABELS[method]}: selection done ({sel['seconds']:.0f} s), rows not evaluated yet "
                           f"({', '.join(missing)})")
            done += len(comps)
            continue
        fidelity = spearman({int(k): v for k, v in sel["first_step_layer_scores"].items()}, oracle_inc)
        for comp in comps:
            done += 1
            row, zs = cached_rows[comp], cached_zs[comp]
            if comp in missing:
                log.info("[%d/%d rows, %.0f min] %s / %s: %s%s", done, expected, (time.perf_counter() - start) / 60,
                         method, comp, "stage 2 + PPL" if row is None else "stage 2 again (deterministic)",
                         f" + zero-shot ({limits[comp] or 'all'} items/task)" if limits[comp] >= 0 and zs is None
                         else "")
                engine, traj, dense_traj = pruned_session(model, calibration, sel, args)
                with engine:
                    stage2 = 0.0
                    notes = []
                    if comp != "none":
                        t0 = time.perf_counter()
                        result = compensate(traj, dense_traj, mode=comp,
                                            ridge=args.replaceme_ridge if comp == "replaceme" else None)
                        stage2 = time.perf_counter() - t0
                        notes = result.notes + [f"layer {f.layer}: ridge {f.ridge}, applied {f.applied}"
                                                for f in result.fits]
                    engine.release(dense_traj)
                    engine.release(traj)
                    if row is None:
                        ev = evaluate_ppl(engine, eval_ids, args)
                        row = {"method": method, "compensation": comp, "removed": sel["removed"],
                               "kept": sel["kept"], "prune_seconds": sel["seconds"], "stage2_seconds": stage2,
                               "passes": sel["passes"], "published_passes": sel.get("published_passes",
                                                                                     sel["passes"]),
                               "peak_bytes": sel["peak_bytes"], "removed_params": sel["removed_params"],
                               "zeroed_params": sel["zeroed_params"], "spearman": fidelity, "stage2_notes": notes,
                               **ev}
                        row = cache.put("row", row_keys[comp], row)
                    if limits[comp] >= 0 and zs is None:
                        zs = evaluate_zs(engine, tokenizer, limits[comp], args, cache, zs_keys[comp])
                log.info("%s / %s: PPL %.3f, zero-shot %s", method, comp, row["ppl"]["ppl"],
                         zs["average"] if zs else None)
            rows.append(dict(row, zeroshot=zs) if zs else row)
            write_outputs(out, rows, dense, oracle, settings, time.perf_counter() - start, expected)

    write_outputs(out, rows, dense, oracle, settings, time.perf_counter() - start, expected, pending)
    print((out / "compare.md").read_text())
    return 0


def write_outputs(out: Path, rows: list[dict], dense: dict, oracle: dict, settings: dict, wall: float,
                  expected: int, pending: list[str] = ()) -> None:
    """Write compare.csv / .json / .md / .png for the rows so far (marked PARTIAL while rows are missing)."""
    flat = table_rows(rows, dense)
    summary = summarize(rows)
    if len(rows) < expected:
        summary[:0] = [f"PARTIAL: {len(rows)} of {expected} rows computed so far (the run is incomplete); rerun the "
                       "same command to complete it (computed rows are reused)."] + list(pending)
    keys = list(dict.fromkeys(k for r in flat for k in r))
    with open(out / "compare.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys)
        w.writeheader()
        w.writerows(flat)
    versions = {}
    for name in ("lm_eval", "scipy", "matplotlib", "datasets"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    (out / "compare.json").write_text(json.dumps(
        {"settings": settings, "rows": rows, "dense": dense, "oracle": oracle, "summary": summary,
         "complete": len(rows) >= expected, "wall_seconds_this_run": wall,
         "environment": dict(environment(), extra_packages=versions)}, indent=1, default=str))
    selections = {r["method"]: r["prune_seconds"] for r in rows}
    recorded = (dense.get("eval_seconds", 0.0) + oracle.get("seconds", 0.0) + sum(selections.values())
                + sum(r["stage2_seconds"] + r.get("eval_seconds", 0.0) for r in rows))
    write_markdown(out / "compare.md", flat, summary, settings, wall, recorded)
    plot(out / "compare.png", rows, dense)


if __name__ == "__main__":
    sys.exit(main())
