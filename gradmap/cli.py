"""Command line: ``gradmap prune | plan | score | eval | export-gguf | env``.

    gradmap prune --ratio 0.25 --output pruned-smollm2            # default model (SmolLM2-135M), Wikipedia text
    gradmap prune --ratio 0.25 --method sleb --compensate none --output sleb-smollm2   # a baseline
    gradmap prune --model ./llama-70b --ratio 0.25 --max-memory 70GiB --output out    # streams what does not fit
    torchrun --nproc-per-node 8 -m gradmap prune --model ./llama-70b --ratio 0.25 --output out   # data parallel
    gradmap plan --model ./llama-70b --ratio 0.25 --max-memory 70GiB   # memory per device, before anything runs
    gradmap score --model ./my-llama --metric taylor               # one scoring pass, every layer's score
    gradmap eval --model pruned-smollm2 --text wiki.test.raw       # perplexity of any model directory
    gradmap eval --model pruned-smollm2 --tasks all --limit 100    # plus zero-shot accuracy (lm-eval, local data)
    gradmap export-gguf pruned-smollm2 pruned.gguf                 # for llama.cpp (its own converter)
    gradmap env                                                    # versions, GPUs, kernels per device (bug reports)

Bad input exits with status 2 and ONE line ``gradmap: error: ...`` naming the flag, before the model's weights are
read (the config, the tokenizer and the texts are checked first); Ctrl-C exits with 130.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import logging
import math
import os
import sys
from pathlib import Path

import huggingface_hub.utils
import torch
import transformers
from transformers import AutoTokenizer

from . import __version__
from .adapters import adapter_for_type, get_adapter
from .api import prune
from .checkpoint import check_output_dir
from .data import build_calibration, load_text, tokenize
from .engine import Engine, ModelWeights, Windows, build_skeleton, init_from_environment, rank_device
from .env import environment_report, format_report
from .engine.memory import GiB, ModelShape, RunSettings, plan_run
from .engine.allocator import return_large_blocks_to_os
from .evaluation import perplexity
from .export_gguf import export_gguf, roundtrip_check
from .methods.gradmap import default_verify_top, default_verify_windows
from .methods.metrics import layer_scores
from .models import (NAMED_MODELS, check_model_dir, default_dtype, load_model, parse_dtype, read_config,
                     resolve_model_path)
from .resume import check_state_file
from .names import (BACKENDS, COMPENSATIONS, DEFAULT_COMPENSATION, DEFAULT_METHOD, DEFAULT_METRIC, METHODS, METRICS)
from .validation import ModelLimits, check_device, check_positive, check_prune_plan, check_threads
from .zeroshot import evaluate_zero_shot, format_table, parse_tasks, task_config

log = logging.getLogger("gradmap")


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``gradmap: error: ...``, exit 2), as every other bad input gets."""

    def error(self, message: str):
        self.exit(2, f"gradmap: error: {message} (see {self.prog} --help)\n")


def _protected(value: str) -> list[int]:
    """``--protected 0,29`` → ``[0, 29]``; empty items, non-integers and repeats are refused."""
    parts = [v.strip() for v in value.split(",")]
    try:
        if value.strip() == "" or any(p == "" for p in parts):
            raise ValueError
        indices = [int(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer indices like 0,29, got {value!r}") from None
    repeated = sorted({i for i in indices if indices.count(i) > 1})
    if repeated:
        raise argparse.ArgumentTypeError(f"layer indices repeated: {repeated} in {value!r}")
    return indices


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default",
                   help=f"local Hugging Face model directory, a .gguf file, or a bundled model: "
                        f"{', '.join(NAMED_MODELS)} (default: default = SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default="auto",
                   help="float32 | bfloat16 | float16 | auto (default auto: bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--device", default="auto", help="cpu | cuda | cuda:N | auto (default auto: cuda if available)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars, warnings only")


def _calib_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--text", default="wiki",
                   help="calibration text: 'wiki' (bundled Wikipedia, calibration split) or a UTF-8 text file")
    p.add_argument("--nsamples", type=int, default=16, help="calibration windows (default 16)")
    p.add_argument("--seqlen", type=int, default=256, help="tokens per calibration window (default 256)")
    p.add_argument("--seed", type=int, default=0, help="calibration sampling seed (default 0)")
    p.add_argument("--micro-batch", type=int, default=8, help="windows per forward/backward (default 8)")


def _eval_args(p: argparse.ArgumentParser, prefix: str = "eval-") -> None:
    p.add_argument(f"--{prefix}text", default="wiki",
                   help="evaluation text: 'wiki' (bundled Wikipedia, test split) or a UTF-8 text file")
    p.add_argument(f"--{prefix}seqlen", type=int, default=1024, help="tokens per window (default 1024)")
    p.add_argument(f"--{prefix}tokens", type=int, default=16384,
                   help="evaluate the first N tokens (default 16384; 0 = all)")


def _zeroshot_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tasks", default=None,
                   help="zero-shot tasks, comma-separated, or 'all' (piqa, hellaswag, boolq, winogrande, arc_easy, "
                        "arc_challenge, openbookqa); default: none")
    p.add_argument("--limit", type=int, default=None, help="zero-shot: first N items per task (default all)")
    p.add_argument("--batch-size", type=int, default=8, help="zero-shot: requests per forward (default 8)")
    p.add_argument("--no-ppl", action="store_true", help="skip the perplexity evaluation (zero-shot only)")


def _counts(value: str) -> list[int]:
    """``--save-at 4,6,8`` → ``[4, 6, 8]``."""
    try:
        counts = [int(v) for v in value.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer counts like 4,6,8, got {value!r}") from None
    if len(set(counts)) != len(counts) or any(c < 1 for c in counts):
        raise argparse.ArgumentTypeError(f"layer counts must be distinct and >= 1, got {value!r}")
    return counts


def _prune_args(p: argparse.ArgumentParser, *, plan: bool = False) -> None:
    """prune's flags; ``plan`` takes them all too (``--output`` optional there, the outputs are not written)."""
    target = p.add_mutually_exclusive_group()
    target.add_argument("--num-layers", type=int, help="number of decoder layers to remove (a ceiling with "
                                                       "--max-ppl-increase)")
    target.add_argument("--ratio", type=float, help="fraction of decoder layers to remove, in (0, 1)")
    p.add_argument("--max-ppl-increase", type=float, default=None, metavar="PCT",
                   help="quality budget: keep removing layers while the held-out calibration perplexity stays within "
                        "PCT percent of the dense model's (--num-layers/--ratio, if given, are a ceiling)")
    p.add_argument("--holdout", type=int, default=None, metavar="N",
                   help="held-out calibration windows (not used for scoring) for the removal curve and the quality "
                        "budget (default max(2, --nsamples / 4); 0 = no curve)")
    p.add_argument("--method", default=DEFAULT_METHOD, choices=METHODS,
                   help=f"layer selection: GradMAP or a baseline (default {DEFAULT_METHOD})")
    p.add_argument("--metric", default=None, choices=METRICS,
                   help=f"stage-1 metric of --method gradmap (default {DEFAULT_METRIC})")
    p.add_argument("--verify-top", type=int, default=None, metavar="K",
                   help="--method gradmap: each decision removes, of the K lowest-scored layers, the one whose removal "
                        "gives the lowest calibration loss (K resumed forwards; default 3; 0 = the paper's gradient "
                        "metric alone)")
    p.add_argument("--verify-windows", type=int, default=None, metavar="N",
                   help="--verify-top: run the loss check on N calibration windows only (default: an eighth of "
                        "--nsamples, at least 1024 tokens' worth; --nsamples for all)")
    p.add_argument("--verify-extend", action="store_true",
                   help="--verify-top: while the lowest loss is the last checked layer's, check the next K layers by "
                        "score too (default off: exactly K)")
    p.add_argument("--verify-margin", type=float, default=None, metavar="M",
                   help="--verify-top: check only layers scored within (1 + M) x the lowest score (default: all K)")
    p.add_argument("--compensate", default=DEFAULT_COMPENSATION, choices=COMPENSATIONS,
                   help=f"compensation: GradMAP stage 2 (max-shift, every-gap), ReplaceMe's T (replaceme) or none "
                        f"(default {DEFAULT_COMPENSATION})")
    p.add_argument("--ridge", type=float, default=None,
                   help="relative ridge (stage 2 default: chosen by k-fold cross-validation on the calibration windows; "
                        "replaceme default: fixed 1e-3)")
    p.add_argument("--folds", type=int, default=None,
                   help="stage-2 cross-validation groups of calibration windows (default min(4, --nsamples))")
    p.add_argument("--protected", type=_protected, default=[], help="comma-separated layer indices never removed")
    p.add_argument("--backend", default="hooks", choices=BACKENDS,
                   help="weight-metric gradient reduction: hooks (default) or fused (Triton on CUDA; no dW stored)")
    p.add_argument("--max-memory", default=None, metavar="SIZE",
                   help="memory budget (accelerate notation, e.g. 20GiB): on CUDA the device's (weights + working "
                        "set), on CPU the host memory weights may hold; layers that do not fit stream from the "
                        "checkpoint (default: the device's memory; unlimited on CPU)")
    p.add_argument("--no-eval", action="store_true", help="skip the perplexity evaluation")
    p.add_argument("--save-at", type=_counts, default=[], metavar="COUNTS",
                   help="also save the model after these removed-layer counts (e.g. 4,6,8): one run writes "
                        "OUTPUT/layers-4/, ... each compensated and with its own report")
    p.add_argument("--no-speed", action="store_true",
                   help="skip measuring dense vs pruned prefill and decode tokens/s on the run's device")
    p.add_argument("--export-gguf", default=None, metavar="FILE",
                   help="also write the pruned model as GGUF for llama.cpp (llama.cpp's own converter)")
    p.add_argument("--gguf-type", default="f32", choices=("f32", "f16", "bf16", "q8_0"),
                   help="GGUF tensor type of --export-gguf (default f32)")
    p.add_argument("--allow-gguf-mismatch", action="store_true",
                   help="write the GGUF even when its readers would rebuild a different model (warned)")
    p.add_argument("--output", required=not plan, help="output directory for the pruned checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    state = p.add_mutually_exclusive_group()
    state.add_argument("--resume", action="store_true",
                       help="continue an interrupted run from its stage-1 state file (.OUTPUT.gradmap-state.json beside "
                            "--output, written after every decision); refused if model, calibration or settings differ")
    state.add_argument("--restart", action="store_true",
                       help="discard the stage-1 state file of an interrupted run and start again")


def build_parser() -> argparse.ArgumentParser:
    """The ``gradmap`` argument parser (subcommands prune, plan, score, eval)."""
    parser = _Parser(prog="gradmap", description="GradMAP layer pruning for causal LLMs "
                     "(gradient metric + projection compensation, arXiv 2602.14649)")
    parser.add_argument("--version", action="version", version=f"gradmap {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("prune", help="remove decoder layers, compensate, evaluate, save")
    _common(p)
    _calib_args(p)
    _eval_args(p)
    _prune_args(p)

    pl = sub.add_parser("plan", help="estimated memory per device and resident vs streamed, before anything runs")
    _common(pl)
    _calib_args(pl)
    _eval_args(pl)
    _prune_args(pl, plan=True)
    pl.add_argument("--world-size", type=int, default=None,
                    help="processes the run will use (default: WORLD_SIZE, or 1)")
    pl.add_argument("--json", action="store_true", help="print JSON")

    s = sub.add_parser("score", help="one scoring pass: every decoder layer's score")
    _common(s)
    _calib_args(s)
    s.add_argument("--metric", default=DEFAULT_METRIC, choices=METRICS)
    s.add_argument("--backend", default="hooks", choices=BACKENDS,
                   help="weight-metric gradient reduction: hooks (default) or fused (no dW stored)")
    s.add_argument("--json", action="store_true", help="print JSON instead of a table")

    g = sub.add_parser("export-gguf", help="write a (pruned) model directory as one GGUF file for llama.cpp")
    g.add_argument("model_dir", help="Hugging Face model directory (e.g. a gradmap prune output)")
    g.add_argument("out", help="the .gguf file to write")
    g.add_argument("--outtype", default="f32", choices=("f32", "f16", "bf16", "q8_0"), help="tensor type (default f32)")
    g.add_argument("--allow-mismatch", action="store_true",
                   help="write even when the GGUF readers would rebuild a different model (warned)")
    g.add_argument("--overwrite", action="store_true", help="replace an existing file")
    g.add_argument("--check", action="store_true",
                   help="reload the GGUF with transformers and compare its logits with the checkpoint's")
    g.add_argument("-q", "--quiet", action="store_true", help="warnings only")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    g.set_defaults(device=None)

    e = sub.add_parser("eval", help="perplexity of a model on a text, and zero-shot accuracy")
    _common(e)
    _eval_args(e, prefix="")
    e.add_argument("--stride", type=int, default=None, help="tokens between window starts (default seqlen)")
    _zeroshot_args(e)
    e.add_argument("--json", action="store_true", help="print JSON")

    v = sub.add_parser("env", help="versions, GPUs and the kernels each device uses (paste it into bug reports)")
    v.add_argument("--json", action="store_true", help="print JSON")
    v.set_defaults(threads=None, device=None, quiet=False)  # read by _setup
    return parser


CLI_NAMES = {"num_layers": "--num-layers", "ratio": "--ratio", "protected": "--protected", "seqlen": "--seqlen",
             "nsamples": "--nsamples", "ridge": "--ridge", "micro_batch": "--micro-batch",
             "eval_seqlen": "--eval-seqlen", "compensate": "--compensate", "text": "--text", "model": "--model",
             "tasks": "--tasks", "resume": "--resume", "folds": "--folds", "metric": "--metric",
             "method": "--method", "backend": "--backend", "verify_top": "--verify-top", "output_dir": "--output",
             "verify_windows": "--verify-windows", "verify_margin": "--verify-margin"}


def _cli_names(exc: Exception, names: dict[str, str] = CLI_NAMES) -> Exception:
    """Rewrite a leading ``keyword:`` of an API error into the command-line flag (``num_layers:`` → ``--num-layers:``)."""
    msg = str(exc)
    head, sep, tail = msg.partition(":")
    return type(exc)(f"{names[head]}:{tail}") if sep and head in names else exc


def _bf16_hardware() -> bool:
    """Whether this CPU has bfloat16 arithmetic (AVX512-BF16 or AMX); without it bf16 matmuls are emulated."""
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="ignore")
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _setup(args) -> None:
    check_threads(args.threads)
    return_large_blocks_to_os()  # freed layers and Gram matrices go back to the system (gradmap.engine.allocator)
    if getattr(args, "device", None) is not None:
        if args.device == "auto":
            args.device = "cuda" if torch.cuda.is_available() else "cpu"
        if args.command == "plan":  # planning a GPU run needs no GPU here (--max-memory gives its size)
            try:
                torch.device(args.device)
            except (RuntimeError, TypeError):
                raise ValueError(f"--device: {args.device!r} is not a torch device; accepted: cpu, cuda, cuda:N") from None
        else:
            check_device(args.device)
        dtype = default_dtype(args.device) if args.dtype == "auto" else parse_dtype(args.dtype)
        args.dtype = str(dtype).replace("torch.", "")
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if args.quiet:  # -q also silences the progress bars of transformers / huggingface_hub (weight loading)
        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
        huggingface_hub.utils.disable_progress_bars()
    if args.threads:
        torch.set_num_threads(args.threads)
    if getattr(args, "device", None) is not None and torch.device(args.device).type == "cpu" and \
            parse_dtype(args.dtype) in (torch.bfloat16, torch.float16) and not _bf16_hardware():
        log.warning("--dtype %s on a CPU without bfloat16/float16 hardware is emulated: scoring was measured 37x "
                    "slower than float32 here; use --dtype float32 on this machine", args.dtype)


def _model_limits(args):
    """Validate ``--model`` from its files and config alone (no weights read); return its path and limits."""
    path = resolve_model_path(args.model)
    check_model_dir(path)
    config = read_config(path)
    try:
        return path, ModelLimits.from_config(config)
    except (AttributeError, TypeError):
        raise ValueError(f"--model: {str(path)!r} (model_type {getattr(config, 'model_type', None)!r}) is not a "
                         "decoder-only causal LM (no num_hidden_layers)") from None


def _text_split(source: str, role: str, other: str | None) -> str:
    """Which part of ``source`` to use for ``role`` ("calibration"/"test"): the bundled text is always split; a user
    file only when the same file serves both roles (otherwise it is used whole)."""
    if source == "wiki" or source == other:
        return role
    return "all"


def _state_path(output: str) -> Path:
    """Stage-1 state file of a ``prune --output OUTPUT`` run: hidden, beside the output directory."""
    out = Path(output).expanduser().absolute()
    return out.parent / f".{out.name}.gradmap-state.json"


@contextlib.contextmanager
def _output_lock(output: str):
    """Hold an exclusive lock on ``--output`` for the whole run (a hidden ``.OUTPUT.gradmap-lock`` beside it), so a
    second prune into the same directory is refused at once instead of colliding at save time.

    Raises:
        ValueError: another gradmap process holds the lock. PermissionError: the lock cannot be created there.
    """
    out = Path(output).expanduser().absolute()
    lock = out.parent / f".{out.name}.gradmap-lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    try:
        fh = open(lock, "a+", encoding="utf-8")
    except OSError as exc:
        raise PermissionError(f"--output: cannot create files in {str(out.parent)!r}: {exc.strerror}") from None
    try:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(f"--output: another gradmap run is writing {str(out)!r} (lock {lock.name}); wait for it "
                             "or choose another --output") from None
        yield
    finally:
        fh.close()
        with contextlib.suppress(OSError):
            lock.unlink()


def _calibration(args, tokenizer, split: str, max_length, holdout: int = 0):
    """The calibration windows and, with ``holdout`` > 0, as many held-out windows disjoint from them (the removal
    curve and quality budget)."""
    text = load_text(args.text, split)
    try:
        calibration = build_calibration(tokenizer, text, nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed,
                                        source=args.text, max_length=max_length)
        held = None
        if holdout:
            held = build_calibration(tokenizer, text, nsamples=holdout, seqlen=args.seqlen, seed=args.seed + 1,
                                     source=args.text, max_length=max_length, exclude=calibration.spec["windows"])
    except ValueError as exc:
        msg = str(exc)
        if msg.startswith("calibration text has"):
            raise ValueError(f"--text: {msg}") from None
        if msg.startswith("nsamples:") and holdout and "excluded" in msg:
            raise ValueError(f"--holdout: {holdout} held-out windows do not fit beside the {args.nsamples} calibration "
                             f"windows: {msg.partition(': ')[2]}") from None
        raise _cli_names(exc) from None
    return calibration, held


def _check_text_files(args, calib_split: str, eval_text: str | None) -> None:
    for flag, text, split in (("--text", args.text, calib_split),
                              ("--eval-text", eval_text, _text_split(eval_text or "", "test", args.text))):
        if text is not None and text != "wiki":
            try:
                load_text(text, split)  # a missing or unreadable file fails now, not after minutes of work
            except (FileNotFoundError, IsADirectoryError, ValueError) as exc:
                raise type(exc)(f"{flag}: {str(exc).partition(': ')[2]}") from None


def _check_prune_flags(args, limits: ModelLimits) -> None:
    if args.num_layers is None and args.ratio is None and args.max_ppl_increase is None:
        raise ValueError("--num-layers: give --num-layers, --ratio or --max-ppl-increase (the quality budget)")
    if args.max_ppl_increase is not None and not args.max_ppl_increase > 0:
        raise ValueError(f"--max-ppl-increase: must be a positive percentage, got {args.max_ppl_increase}")
    if args.max_ppl_increase is not None and args.method == "blockpruner":
        raise ValueError("--max-ppl-increase: BlockPruner removes sub-blocks toward a parameter budget; use "
                         "--num-layers/--ratio with it")
    if args.holdout is not None and args.holdout < 0:
        raise ValueError(f"--holdout: must be >= 0, got {args.holdout}")
    if args.holdout == 0 and args.max_ppl_increase is not None:
        raise ValueError("--holdout: the quality budget needs held-out windows; give --holdout >= 1")
    if getattr(args, "save_at", None) and args.method == "blockpruner":
        raise ValueError("--save-at: BlockPruner's removal order mixes sub-blocks and layers; no layer-count save points")
    if args.metric is not None and args.method != "gradmap":
        raise ValueError(f"--metric: applies to --method gradmap only (--method {args.method} has its own score)")
    if args.backend != "hooks" and args.method not in ("gradmap", "taylor-plus"):
        raise ValueError(f"--backend: applies to the gradient methods (gradmap, taylor-plus) only, "
                         f"not --method {args.method}")
    if args.backend == "fused" and adapter_for_type(limits.model_type).mlp_out_kind != "linear":
        raise ValueError(f"--backend: fused needs nn.Linear projections; {limits.model_type} uses Conv1D: use "
                         "--backend hooks")
    if args.ridge is not None and args.compensate == "none":
        raise ValueError("--ridge: has no effect with --compensate none")
    if args.folds is not None and args.compensate == "none":
        raise ValueError("--folds: has no effect with --compensate none")
    verify_top = _verify_top(args, limits.num_layers)
    if verify_top < 0:
        raise ValueError(f"--verify-top: must be >= 0, got {args.verify_top}")
    if args.verify_top and args.method != "gradmap":
        raise ValueError(f"--verify-top: applies to --method gradmap only, not --method {args.method}")
    if (args.verify_windows is not None or args.verify_margin is not None) and verify_top < 2:
        raise ValueError("--verify-windows/--verify-margin: apply to the loss check of --verify-top K (K >= 2)")
    if args.verify_extend and verify_top < 2:
        raise ValueError("--verify-extend: applies to the loss check of --verify-top K (K >= 2)")
    if args.verify_windows is not None and not 1 <= args.verify_windows <= args.nsamples:
        raise ValueError(f"--verify-windows: need 1 <= --verify-windows <= --nsamples={args.nsamples}, "
                         f"got {args.verify_windows}")
    if args.verify_margin is not None and not (math.isfinite(args.verify_margin) and args.verify_margin >= 0):
        raise ValueError(f"--verify-margin: must be a finite number >= 0, got {args.verify_margin}")
    if verify_top > limits.num_layers:
        raise ValueError(f"--verify-top: {verify_top} is more than the model's {limits.num_layers} decoder "
                         "layers (at that size it is SLEB at SLEB's cost; use --method sleb)")
    if args.folds is not None and not 2 <= args.folds <= args.nsamples:
        raise ValueError(f"--folds: need 2 <= --folds <= --nsamples={args.nsamples}, got {args.folds}")
    if not args.no_eval and args.eval_tokens not in (0, None) and args.eval_tokens < 2:
        raise ValueError(f"--eval-tokens: must be 0 (all tokens) or >= 2, got {args.eval_tokens}")
    num_layers = args.num_layers
    if num_layers is None and args.ratio is None:  # the budget alone: its ceiling is every removable layer
        num_layers = limits.num_layers - 1 - len(set(args.protected))
    try:
        target = check_prune_plan(limits, num_layers=num_layers, ratio=args.ratio, protected=args.protected,
                         seqlen=args.seqlen, nsamples=args.nsamples, compensate=args.compensate, ridge=args.ridge,
                         micro_batch=args.micro_batch, eval_seqlen=None if args.no_eval else args.eval_seqlen,
                         names=CLI_NAMES)
    except ValueError as exc:
        raise _cli_names(exc) from None
    too_far = [c for c in getattr(args, "save_at", []) if c > target]
    if too_far:
        raise ValueError(f"--save-at: {too_far} exceed the {target} layers the run removes at most")


def _verify_top(args, num_layers: int) -> int:
    """``--verify-top`` as given, or its default for a model of ``num_layers`` decoder layers: 3 for GradMAP
    (:func:`gradmap.methods.gradmap.default_verify_top`), 0 for the baselines."""
    if args.verify_top is not None:
        return args.verify_top
    return default_verify_top(num_layers) if args.method == "gradmap" else 0


def _run_settings(args, parallel_world: int, num_layers: int) -> RunSettings:
    compensating = args.compensate != "none"
    top = _verify_top(args, num_layers)
    check_windows = (getattr(args, "verify_windows", None) or default_verify_windows(args.nsamples, args.seqlen)
                     if top >= 2 else None)
    return RunSettings(nsamples=args.nsamples, seqlen=args.seqlen, micro_batch=args.micro_batch,
                       world_size=parallel_world, compensate=compensating,
                       folds=(args.folds or min(4, args.nsamples)) if compensating else 1,
                       candidates=top or (1 if args.method == "gradmap" else 2), candidate_windows=check_windows,
                       eval_seqlen=None if args.no_eval else args.eval_seqlen)


def cmd_plan(args) -> int:
    """``gradmap plan``: the memory plan of a prune with the same flags, nothing loaded (a directory with only a
    ``config.json`` is enough)."""
    path = resolve_model_path(args.model)
    config = read_config(path)
    limits = ModelLimits.from_config(config)
    adapter_for_type(limits.model_type)
    _check_prune_flags(args, limits)
    world = args.world_size or int(os.environ.get("WORLD_SIZE", "1"))
    check_positive(world, "--world-size")
    device = torch.device(args.device)
    if device.type == "cuda" and args.max_memory is None and not torch.cuda.is_available():
        raise ValueError("--max-memory: planning a CUDA run on a machine without one needs the GPU's size "
                         "(e.g. --max-memory 80GiB)")
    skeleton_plan = _plan(args, path, device, world)
    if args.json:
        print(json.dumps(skeleton_plan.as_dict(), indent=2))
        return 0
    print(format_plan(skeleton_plan, world))
    return 0 if skeleton_plan.fits else 2


def _plan(args, path: Path, device: torch.device, world: int):
    skeleton = build_skeleton(read_config(path))
    capacity = (torch.cuda.get_device_properties(device).total_memory
                if device.type == "cuda" and torch.cuda.is_available() else None)
    shape = ModelShape.from_model(skeleton)
    return plan_run(shape, _run_settings(args, world, shape.num_layers), device=device,
                    dtype=parse_dtype(args.dtype), max_memory=args.max_memory, device_capacity=capacity)


def format_plan(plan, world: int = 1) -> str:
    """The memory plan as a table (GiB), one row per item, for ``gradmap plan`` and prune's refusal."""
    rows = [("resident weights", plan.resident_weights), ("streamed layers in flight", plan.streamed_slots),
            ("activations per micro-batch (forward)", plan.activations_forward),
            ("activations per micro-batch (backward)", plan.activations_backward),
            ("boundary hidden states", plan.boundary_states), ("hidden-state gradients", plan.gradients),
            ("LM head (logits chunk)", plan.lm_head), ("Gram matrices (stage 2)", plan.gram),
            ("score buffers", plan.scores)]
    lines = [f"plan: {plan.mode} on {plan.device} ({plan.dtype}), {world} process(es); weights "
             f"{plan.weights_total / GiB:.2f} GiB, {plan.resident_layers} layers resident, {plan.streamed_layers} "
             "streamed"]
    lines += [f"  {name:<40} {value / GiB:>10.3f} GiB" for name, value in rows]
    lines.append(f"  {'  of which on ' + plan.device:<40} {plan.device_states / GiB:>10.3f} GiB")
    lines.append(f"  {'  spilled to host memory':<40} {plan.host_states / GiB:>10.3f} GiB")
    if plan.stride > 1:
        lines.append(f"  {'  stored: every k-th boundary, k =':<40} {plan.stride:>10d}")
    lines.append(f"  {'estimated peak on ' + plan.device:<40} {plan.peak_device / GiB:>10.3f} GiB")
    if plan.device.startswith("cuda"):
        lines.append(f"  {'host memory (weights + spilled states)':<40} {plan.peak_host / GiB:>10.3f} GiB")
    lines.append(f"  {'weight bytes moved per decision':<40} {plan.moved_per_decision / GiB:>10.3f} GiB")
    if plan.budget:
        lines.append("  budget: " + ", ".join(f"{k} {v / GiB:.2f} GiB" for k, v in plan.budget.items()))
    if not plan.fits:
        lines.append(f"  DOES NOT FIT: {plan.advice}")
    return "\n".join(lines)


def cmd_prune(args) -> int:
    """``gradmap prune``: the whole pipeline; prints the PPL table and where the checkpoint went."""
    parallel = init_from_environment(args.device)
    device = rank_device(args.device)
    args.metric = args.metric or (DEFAULT_METRIC if args.method == "gradmap" else None)
    try:
        check_output_dir(args.output, args.overwrite)
    except (ValueError, OSError) as exc:
        raise type(exc)(str(exc).replace("output_dir:", "--output:", 1).replace("overwrite=True (--overwrite)",
                                                                                  "--overwrite")) from None
    path, limits = _model_limits(args)
    out = Path(args.output).expanduser().absolute()
    if out == path.absolute() or path.absolute() in out.parents:
        raise ValueError(f"--output: {str(out)!r} is the input model's directory (or inside it); writing there would "
                         "replace the model being pruned: choose another --output")
    _check_prune_flags(args, limits)
    eval_text = None if args.no_eval else args.eval_text
    calib_split = _text_split(args.text, "calibration", eval_text)
    _check_text_files(args, calib_split, eval_text)
    plan = _plan(args, path, device, parallel.world_size)
    if not plan.fits:
        raise ValueError(f"--max-memory: the run does not fit: {plan.advice}")
    state = _state_path(args.output)
    lock = _output_lock(args.output) if parallel.is_main else contextlib.nullcontext()
    with lock:
        if state.exists() and not (args.resume or args.restart):
            raise ValueError(f"--resume: an interrupted run's stage-1 state ({state}) exists for this --output: pass "
                             "--resume to continue it or --restart to discard it")
        if args.resume and state.exists():
            check_state_file(state)  # a broken file is refused now, not after the weights are read
        if args.resume and not state.exists():
            log.warning("--resume: no state file %s (no interrupted run recorded): starting from the first decision",
                        state)
        if args.restart and state.exists() and parallel.is_main:
            state.unlink()
        parallel.barrier()
        tokenizer = AutoTokenizer.from_pretrained(path)
        holdout = args.holdout if args.holdout is not None else max(2, args.nsamples // 4)
        calibration, held = _calibration(args, tokenizer, calib_split, limits.max_length, holdout)
        eval_ids = None
        if not args.no_eval:
            eval_ids = tokenize(tokenizer, load_text(args.eval_text, _text_split(args.eval_text, "test", args.text)))
            if eval_ids.numel() < 2:
                raise ValueError(f"--eval-text: the evaluation text has {eval_ids.numel()} tokens; need at least 2")
        log.info("%s: %s run on %s (%s), weights %.2f GiB, estimated peak %.2f GiB", path, plan.mode, device,
                 args.dtype, plan.weights_total / GiB, plan.peak_device / GiB)
        result = prune(str(path) if args.model not in NAMED_MODELS else args.model, calibration,
                       num_layers=args.num_layers, ratio=args.ratio, method=args.method, holdout=held,
                       max_ppl_increase=args.max_ppl_increase, save_at=args.save_at,
                       measure_speed=not args.no_speed and plan.mode == "resident",
                       metric=args.metric or DEFAULT_METRIC, compensate_mode=args.compensate, ridge=args.ridge,
                       protected=args.protected, micro_batch=args.micro_batch, eval_tokens=eval_ids,
                       eval_seqlen=args.eval_seqlen, eval_max_tokens=args.eval_tokens or None, seed=args.seed,
                       backend=args.backend, progress=not args.quiet and parallel.is_main,
                       resume=state if args.method == "gradmap" else None, verify_top=args.verify_top,
                       verify_windows=args.verify_windows, verify_margin=args.verify_margin,
                       verify_extend=args.verify_extend,
                       folds=args.folds, max_memory=args.max_memory, device=device, dtype=args.dtype)
        result.settings.update(model=str(args.model), text=args.text, eval_text=args.eval_text,
                               text_split=calib_split)
        if parallel.is_main:
            if args.save_at:
                points = result.save_points(args.output, tokenizer, overwrite=args.overwrite)
                written = points[len(result.removed)]
            else:
                written = result.save(args.output, tokenizer, overwrite=args.overwrite)
            state.unlink(missing_ok=True)  # the checkpoint is complete: nothing left to resume
            if args.export_gguf:
                export_gguf(written, args.export_gguf, outtype=args.gguf_type, allow_mismatch=args.allow_gguf_mismatch,
                            overwrite=args.overwrite)
                log.info("GGUF written: %s", args.export_gguf)
        parallel.barrier()
    if not parallel.is_main:
        return 0
    _print_result(args, result, written)
    return 0


def _print_result(args, result, path: Path) -> None:
    print()
    print(f"method {args.method}: removed layers (original indices): {sorted(result.removed)}  "
          f"(removal order {result.removed}); {result.selection.passes:.1f} forward-equivalent passes")
    if result.removed_original is not None:
        print(f"in the original dense model of this chain: removed {sorted(result.removed_original)}, "
              f"kept {result.kept_original}")
    if result.selection.extra.get("zeroed_sub_blocks"):
        print(f"zeroed sub-blocks: {result.selection.extra['zeroed_sub_blocks']}")
    if result.selection.extra.get("note"):
        print(f"note: {result.selection.extra['note']}")
    if result.perplexity:
        print(f"{'model':<12} {'layers':>6} {'PPL':>9} {'tokens':>8} {'tok/s':>8}")
        for name, r in result.perplexity.items():
            layers = len(result.kept) + (len(result.removed) if name == "dense" else 0)
            print(f"{name:<12} {layers:>6} {r['ppl']:>9.3f} {r['tokens']:>8} {r['tokens_per_s']:>8.0f}")
    t = result.timings
    print("time (s): " + ", ".join(f"{k} {v:.1f}" for k, v in t.items()))
    if result.curve:
        c = result.curve
        line = ", ".join(f"{p['removed']}: {p['holdout_ppl']:.2f}" for p in c["curve"])
        print(f"held-out calibration PPL after each removal: {line}")
        if c.get("stopped"):
            print(f"quality budget: stopped after {len(result.removed)} layers (removing layer "
                  f"{c['stopped']['layer']} would give held-out PPL {c['stopped']['holdout_ppl']:.2f} > "
                  f"{c['limit']:.2f}, dense {c['dense_holdout_ppl']:.2f} + {c['max_ppl_increase']:g} %)")
    if result.speed:
        sp = result.speed
        print(f"speed on {sp['dense'].get('device', '?')}: prefill {sp['dense']['prefill_tokens_per_s']:.0f} -> "
              f"{sp['pruned']['prefill_tokens_per_s']:.0f} tokens/s ({sp['speedup']['prefill']:.2f}x), decode "
              f"{sp['dense']['decode_tokens_per_s']:.1f} -> {sp['pruned']['decode_tokens_per_s']:.1f} tokens/s "
              f"({sp['speedup']['decode']:.2f}x)")
    for note in result.compensation.notes:
        print(f"stage 2 note: {note}")
    print(f"checkpoint: {path}  (report: {path / 'gradmap_report.json'})")


def cmd_score(args) -> int:
    """``gradmap score``: one scoring pass over the calibration set, every layer's score."""
    path, limits = _model_limits(args)
    try:
        check_positive(args.nsamples, "--nsamples")
        check_positive(args.micro_batch, "--micro-batch")
        check_positive(args.seqlen, "--seqlen", minimum=2)
    except ValueError as exc:
        raise _cli_names(exc) from None
    if limits.max_length is not None and args.seqlen > limits.max_length:
        raise ValueError(f"--seqlen: {args.seqlen} exceeds the model's maximum sequence length {limits.max_length}")
    if args.backend == "fused" and adapter_for_type(limits.model_type).mlp_out_kind != "linear":
        raise ValueError(f"--backend: fused needs nn.Linear projections; {limits.model_type} uses Conv1D: use "
                         "--backend hooks")
    _check_text_files(args, _text_split(args.text, "calibration", None), None)
    tokenizer = AutoTokenizer.from_pretrained(path)
    calibration, _ = _calibration(args, tokenizer, _text_split(args.text, "calibration", None), limits.max_length)
    log.info("loading model %s", args.model)
    model, _ = load_model(path, dtype=args.dtype, device=args.device)
    engine = Engine(ModelWeights(model, get_adapter(model), device=torch.device(args.device),
                                 dtype=parse_dtype(args.dtype)), progress=not args.quiet)
    try:
        traj = engine.trajectory(Windows.from_calibration(calibration, args.micro_batch))
        scores, stats = layer_scores(traj, args.metric, backend=args.backend)
    finally:
        engine.close()
    order = sorted(range(len(scores)), key=lambda i: float(scores[i]))
    if args.json:
        print(json.dumps({"metric": args.metric, "backend": args.backend, "scores": scores.tolist(), "order": order,
                          "seconds": stats.seconds, "tokens": stats.tokens}))
        return 0
    print(f"{'layer':>5} {'score':>14} {'rank':>5}")
    rank = {layer: r for r, layer in enumerate(order)}
    for i, s in enumerate(scores.tolist()):
        print(f"{i:>5} {s:>14.6g} {rank[i]:>5}")
    print(f"{args.metric}: {stats.tokens} tokens in {stats.seconds:.1f} s; removal order {order}")
    return 0


def cmd_eval(args) -> int:
    """``gradmap eval``: perplexity of a model on a text and, with ``--tasks``, zero-shot accuracy."""
    path, limits = _model_limits(args)
    if not args.no_ppl:
        if args.seqlen < 2 or (limits.max_length is not None and args.seqlen > limits.max_length):
            raise ValueError(f"--seqlen: must be in [2, {limits.max_length}] (the model's maximum), got {args.seqlen}")
        if args.stride is not None and not 1 <= args.stride <= args.seqlen:
            raise ValueError(f"--stride: must be in [1, --seqlen={args.seqlen}] (unset: = seqlen), got {args.stride}")
        if args.tokens not in (0, None) and args.tokens < 2:
            raise ValueError(f"--tokens: must be 0 (all tokens) or >= 2, got {args.tokens}")
    zero_shot = None
    tasks = None
    if args.tasks is not None:
        try:
            tasks = parse_tasks(args.tasks)  # bad names, missing lm_eval or data: fail before the model loads
            for task in tasks:
                task_config(task)
        except ValueError as exc:
            raise _cli_names(exc) from None
        if args.limit is not None and args.limit < 1:
            raise ValueError(f"--limit: must be >= 1, got {args.limit}")
        if args.batch_size < 1:
            raise ValueError(f"--batch-size: must be >= 1, got {args.batch_size}")
    elif args.no_ppl:
        raise ValueError("--no-ppl: nothing to evaluate without --tasks")
    text = None
    if not args.no_ppl:
        _check_text_files(argparse.Namespace(text=args.text), _text_split(args.text, "test", None), None)
        text = load_text(args.text, _text_split(args.text, "test", None))
    log.info("loading model %s", args.model)
    model, tokenizer = load_model(path, dtype=args.dtype, device=args.device)
    r = None
    if text is not None:
        ids = tokenize(tokenizer, text)
        r = perplexity(model, ids, seqlen=args.seqlen, stride=args.stride, max_tokens=args.tokens or None,
                       progress=not args.quiet)
    if tasks is not None:
        zero_shot = evaluate_zero_shot(model, tokenizer, tasks, limit=args.limit, batch_size=args.batch_size,
                                       progress=not args.quiet)
    if args.json:
        if zero_shot is None:
            print(json.dumps(r.as_dict()))
        else:
            print(json.dumps({"perplexity": r.as_dict() if r else None, "zero_shot": zero_shot.as_dict()}))
        return 0
    if r is not None:
        print(f"PPL {r.ppl:.3f} on {r.tokens} tokens (seqlen {r.seqlen}, stride {r.stride}, "
              f"{r.tokens_per_s:.0f} tok/s)")
    if zero_shot is not None:
        print(format_table(zero_shot))
    return 0


def cmd_export_gguf(args) -> int:
    """``gradmap export-gguf DIR OUT.gguf``: llama.cpp's converter on a model directory, refusing a GGUF that its
    readers would rebuild as a different model (unless ``--allow-mismatch``)."""
    path = resolve_model_path(args.model_dir)
    check_model_dir(path)
    out = export_gguf(path, args.out, outtype=args.outtype, allow_mismatch=args.allow_mismatch,
                      overwrite=args.overwrite)
    print(f"GGUF: {out} ({out.stat().st_size / 2**20:.1f} MiB, {args.outtype})")
    if args.check:
        check = roundtrip_check(path, out)
        print(f"round trip: max |logit difference| {check['max_abs_diff']:.3g} (largest |logit| "
              f"{check['max_abs_logit']:.3g}) on {check['batch_size']}x{check['seq_len']} tokens")
    return 0


def cmd_env(args) -> int:
    """``gradmap env``: versions, GPUs, the stage-2 ops backend and the kernel path per device."""
    report = environment_report()
    print(json.dumps(report, indent=1) if args.json else format_report(report))
    return 0


def _check_counts(args) -> None:
    """Reject negative token counts before any work (0 means "all tokens")."""
    for name in ("eval_tokens", "tokens"):
        value = getattr(args, name, None)
        if value is not None and value < 0:
            raise ValueError(f"--{name.replace('_', '-')}: must be >= 0 (0 = all tokens), got {value}")


COMMANDS = {"prune": cmd_prune, "plan": cmd_plan, "score": cmd_score, "eval": cmd_eval,
            "export-gguf": cmd_export_gguf, "env": cmd_env}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``gradmap`` command; returns the exit status.

    Bad input (a named ``ValueError``, a missing/unwritable path) prints one line ``gradmap: error: ...`` to stderr
    and returns 2, like argparse's own usage errors; Ctrl-C prints ``gradmap: interrupted`` and returns 130. Any
    other exception is a bug and keeps its traceback.
    """
    args = build_parser().parse_args(argv)
    try:
        _setup(args)
        _check_counts(args)
        return COMMANDS[args.command](args)
    except (ValueError, OSError, ImportError) as exc:
        message = " ".join(str(_cli_names(exc)).split()) or type(exc).__name__
        print(f"gradmap: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gradmap: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
