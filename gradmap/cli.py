"""Command line: ``gradmap prune | score | eval | env``.

    gradmap prune --ratio 0.25 --output pruned-smollm2            # default model (SmolLM2-135M), Wikipedia text
    gradmap prune --ratio 0.25 --method sleb --compensate none --output sleb-smollm2   # a baseline
    gradmap score --model ./my-llama --metric taylor               # one scoring pass, every layer's score
    gradmap eval --model pruned-smollm2 --text wiki.test.raw       # perplexity of any model directory
    gradmap eval --model pruned-smollm2 --tasks all --limit 100    # plus zero-shot accuracy (lm-eval, local data)
    gradmap env                                                    # versions, GPUs, kernels per device
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from . import __version__

log = logging.getLogger("gradmap")


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
                   help="local Hugging Face model directory, or 'default' (bundled SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16 (default float32)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
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


def build_parser() -> argparse.ArgumentParser:
    """The ``gradmap`` argument parser (subcommands prune, score, eval, env)."""
    from .methods import COMPENSATIONS, METHODS
    from .scoring import METRICS
    from .api import DEFAULT_COMPENSATION, DEFAULT_METHOD, DEFAULT_METRIC

    parser = argparse.ArgumentParser(prog="gradmap", description="GradMAP layer pruning for causal LLMs "
                                     "(gradient metric + projection compensation, arXiv 2602.14649)")
    parser.add_argument("--version", action="version", version=f"gradmap {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prune", help="remove decoder layers, compensate, evaluate, save")
    _common(p)
    _calib_args(p)
    _eval_args(p)
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--num-layers", type=int, help="number of decoder layers to remove")
    target.add_argument("--ratio", type=float, help="fraction of decoder layers to remove, in (0, 1)")
    p.add_argument("--method", default=DEFAULT_METHOD, choices=METHODS,
                   help=f"layer selection: GradMAP or a baseline (default {DEFAULT_METHOD})")
    p.add_argument("--metric", default=None, choices=METRICS,
                   help=f"stage-1 metric of --method gradmap (default {DEFAULT_METRIC})")
    p.add_argument("--verify-top", type=int, default=0, metavar="K",
                   help="--method gradmap: each decision removes, of the K lowest-scored layers, the one whose removal "
                        "gives the lowest calibration loss (K resumed forwards; default 0 = the gradient metric alone)")
    p.add_argument("--compensate", default=DEFAULT_COMPENSATION, choices=COMPENSATIONS,
                   help=f"compensation: GradMAP stage 2 (max-shift, every-gap), ReplaceMe's T (replaceme) or none "
                        f"(default {DEFAULT_COMPENSATION})")
    p.add_argument("--ridge", type=float, default=None,
                   help="relative ridge (stage 2 default: chosen by k-fold cross-validation on the calibration windows; "
                        "replaceme default: fixed 1e-3)")
    p.add_argument("--protected", type=_protected, default=[], help="comma-separated layer indices never removed")
    p.add_argument("--backend", default="hooks", choices=("hooks", "fused"),
                   help="weight-metric gradient reduction: hooks (default) or fused (Triton on CUDA; no dW stored)")
    p.add_argument("--no-eval", action="store_true", help="skip the perplexity evaluation")
    p.add_argument("--output", required=True, help="output directory for the pruned checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run from its stage-1 state file (.OUTPUT.gradmap-state.json beside "
                        "--output, written after every decision); refused if model, calibration or settings differ")

    s = sub.add_parser("score", help="one scoring pass: every decoder layer's score")
    _common(s)
    _calib_args(s)
    s.add_argument("--metric", default=DEFAULT_METRIC, choices=METRICS)
    s.add_argument("--backend", default="hooks", choices=("hooks", "fused"),
                   help="weight-metric gradient reduction: hooks (default) or fused (no dW stored)")
    s.add_argument("--json", action="store_true", help="print JSON instead of a table")

    e = sub.add_parser("eval", help="perplexity of a model on a text, and zero-shot accuracy")
    _common(e)
    _eval_args(e, prefix="")
    e.add_argument("--stride", type=int, default=None, help="tokens between window starts (default seqlen)")
    _zeroshot_args(e)
    e.add_argument("--json", action="store_true", help="print JSON")

    v = sub.add_parser("env", help="versions, GPUs and the kernels each device uses (paste it into bug reports)")
    v.add_argument("--json", action="store_true", help="print JSON")
    v.set_defaults(threads=None, device="cpu", quiet=False)  # read by _setup
    return parser


def _check_counts(args) -> None:
    """Reject negative token counts before any work (0 means "all tokens")."""
    for name in ("eval_tokens", "tokens"):
        value = getattr(args, name, None)
        if value is not None and value < 0:
            raise ValueError(f"--{name.replace('_', '-')}: must be >= 0 (0 = all tokens), got {value}")


CLI_NAMES = {"num_layers": "--num-layers", "ratio": "--ratio", "protected": "--protected", "seqlen": "--seqlen",
             "nsamples": "--nsamples", "ridge": "--ridge", "micro_batch": "--micro-batch",
             "eval_seqlen": "--eval-seqlen", "compensate": "--compensate", "text": "--text"}


def _cli_names(exc: ValueError, names: dict[str, str] = CLI_NAMES) -> ValueError:
    """Rewrite a leading ``keyword:`` of an API error into the command-line flag (``num_layers:`` → ``--num-layers:``)."""
    msg = str(exc)
    head, sep, tail = msg.partition(":")
    return ValueError(f"{names[head]}:{tail}") if sep and head in names else exc


def _setup(args) -> None:
    import torch

    from .validation import check_device, check_threads

    check_threads(args.threads)
    check_device(args.device)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if args.quiet:  # -q also silences the progress bars of transformers / huggingface_hub (weight loading)
        import huggingface_hub.utils
        import transformers

        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
        huggingface_hub.utils.disable_progress_bars()
    if args.threads:
        torch.set_num_threads(args.threads)


def _model_limits(args):
    """Validate ``--model`` from its files and config alone (no weights read); return its :class:`ModelLimits`."""
    from transformers import AutoConfig

    from .models import resolve_model_path
    from .validation import ModelLimits, check_model_dir

    path = resolve_model_path(args.model)
    check_model_dir(path)
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(f"--model: {str(path)!r} has a config.json that transformers cannot read: {exc}") from None
    try:
        return ModelLimits.from_config(config)
    except (AttributeError, TypeError):
        raise ValueError(f"--model: {str(path)!r} (model_type {getattr(config, 'model_type', None)!r}) is not a "
                         "decoder-only causal LM (no num_hidden_layers)") from None


def _text_split(source: str, role: str, other: str | None) -> str:
    """Which part of ``source`` to use for ``role`` ("calibration"/"test"): the bundled text is always split; a user
    file only when the same file serves both roles (otherwise it is used whole)."""
    if source == "wiki" or source == other:
        return role
    return "all"


def _state_path(output: str):
    """Stage-1 state file of a ``prune --output OUTPUT`` run: hidden, beside the output directory."""
    from pathlib import Path

    out = Path(output).expanduser().absolute()
    return out.parent / f".{out.name}.gradmap-state.json"


def _load(args):
    from .models import load_model

    log.info("loading model %s", args.model)
    return load_model(args.model, dtype=args.dtype, device=args.device)


def _calibration(args, model, tokenizer, split: str = "calibration"):
    from .data import build_calibration, load_text

    text = load_text(args.text, split)
    return build_calibration(tokenizer, text, nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed,
                             source=args.text, max_length=getattr(model.config, "max_position_embeddings", None))


def cmd_prune(args) -> int:
    """``gradmap prune``: the whole pipeline; prints the PPL table and where the checkpoint went."""
    from .api import DEFAULT_METRIC, prune
    from .checkpoint import check_output_dir
    from .data import load_text, tokenize
    from .models import parse_dtype
    from .validation import check_prune_plan

    # Every check that needs no weights runs first: a bad flag fails in well under a second.
    parse_dtype(args.dtype)
    if args.metric is not None and args.method != "gradmap":
        raise ValueError(f"--metric: applies to --method gradmap only (--method {args.method} has its own score)")
    if args.backend != "hooks" and args.method not in ("gradmap", "taylor-plus"):
        raise ValueError(f"--backend: applies to the gradient methods (gradmap, taylor-plus) only, "
                         f"not --method {args.method}")
    if args.ridge is not None and args.compensate == "none":
        raise ValueError("--ridge: has no effect with --compensate none")
    if args.verify_top < 0:
        raise ValueError(f"--verify-top: must be >= 0, got {args.verify_top}")
    if args.verify_top and args.method != "gradmap":
        raise ValueError(f"--verify-top: applies to --method gradmap only, not --method {args.method}")
    args.metric = args.metric or DEFAULT_METRIC
    try:
        check_output_dir(args.output, args.overwrite)
    except (ValueError, OSError) as exc:
        raise type(exc)(str(exc).replace("output_dir:", "--output:", 1).replace("overwrite=True (--overwrite)",
                                                                                  "--overwrite")) from None
    eval_text = None if args.no_eval else args.eval_text
    if not args.no_eval and args.eval_tokens not in (0, None) and args.eval_tokens < 2:
        raise ValueError(f"--eval-tokens: must be 0 (all tokens) or >= 2, got {args.eval_tokens}")
    calib_split = _text_split(args.text, "calibration", eval_text)
    for flag, text, split in (("--text", args.text, calib_split),
                              ("--eval-text", eval_text, _text_split(eval_text or "", "test", args.text))):
        if text is not None and text != "wiki":
            try:
                load_text(text, split)  # a missing or too short file fails now, not after the model has loaded
            except (FileNotFoundError, IsADirectoryError, ValueError) as exc:
                raise type(exc)(f"{flag}: {str(exc).partition(': ')[2]}") from None
    limits = _model_limits(args)
    try:
        check_prune_plan(limits, num_layers=args.num_layers, ratio=args.ratio, protected=args.protected,
                         seqlen=args.seqlen, nsamples=args.nsamples, compensate=args.compensate, ridge=args.ridge,
                         micro_batch=args.micro_batch, eval_seqlen=None if args.no_eval else args.eval_seqlen,
                         names=CLI_NAMES)
    except ValueError as exc:
        raise _cli_names(exc) from None
    if args.resume and args.method != "gradmap":
        raise ValueError(f"--resume: only --method gradmap records resumable decisions, got --method {args.method}")
    state = _state_path(args.output)
    if args.resume and not state.exists():
        log.warning("--resume: no state file %s (no interrupted run recorded): starting from the first decision", state)
    if state.exists() and not args.resume:
        log.warning("deleting the stage-1 state file %s of an earlier run (pass --resume to continue it)", state)
        state.unlink()
    model, tokenizer = _load(args)
    calibration = _calibration(args, model, tokenizer, calib_split)
    eval_ids = None
    if not args.no_eval:
        eval_ids = tokenize(tokenizer, load_text(args.eval_text, _text_split(args.eval_text, "test", args.text)))
    result = prune(model, calibration, num_layers=args.num_layers, ratio=args.ratio, method=args.method,
                   metric=args.metric,
                   compensate_mode=args.compensate, ridge=args.ridge, protected=args.protected,
                   micro_batch=args.micro_batch, eval_tokens=eval_ids, eval_seqlen=args.eval_seqlen,
                   eval_max_tokens=args.eval_tokens or None, seed=args.seed, inplace=True, backend=args.backend,
                   progress=not args.quiet, resume=state if args.method == "gradmap" else None,
                   verify_top=args.verify_top)
    result.settings.update(model=str(args.model), dtype=args.dtype, text=args.text, eval_text=args.eval_text,
                           text_split=calib_split)
    path = result.save(args.output, tokenizer, overwrite=args.overwrite)
    state.unlink(missing_ok=True)  # the checkpoint is complete: nothing left to resume
    print()
    print(f"method {args.method}: removed layers (original indices): {sorted(result.removed)}  "
          f"(removal order {result.removed}); {result.selection.passes:g} forward-equivalent passes")
    if result.selection.extra.get("zeroed_sub_blocks"):
        print(f"zeroed sub-blocks: {result.selection.extra['zeroed_sub_blocks']}")
    if result.perplexity:
        print(f"{'model':<12} {'layers':>6} {'PPL':>9} {'tokens':>8} {'tok/s':>8}")
        for name, r in result.perplexity.items():
            layers = len(result.kept) + (len(result.removed) if name == "dense" else 0)
            print(f"{name:<12} {layers:>6} {r['ppl']:>9.3f} {r['tokens']:>8} {r['tokens_per_s']:>8.0f}")
    t = result.timings
    print("time (s): " + ", ".join(f"{k} {v:.1f}" for k, v in t.items()))
    for note in result.compensation.notes:
        print(f"stage 2 note: {note}")
    print(f"checkpoint: {path}  (report: {path / 'gradmap_report.json'})")
    return 0


def cmd_score(args) -> int:
    """``gradmap score``: one scoring pass over the calibration set, every layer's score."""
    from .scoring import layer_scores
    from .validation import check_positive

    limits = _model_limits(args)
    try:
        check_positive(args.nsamples, "--nsamples")
        check_positive(args.micro_batch, "--micro-batch")
        check_positive(args.seqlen, "--seqlen", minimum=2)
    except ValueError as exc:
        raise _cli_names(exc) from None
    if limits.max_length is not None and args.seqlen > limits.max_length:
        raise ValueError(f"--seqlen: {args.seqlen} exceeds the model's maximum sequence length {limits.max_length}")
    model, tokenizer = _load(args)
    calibration = _calibration(args, model, tokenizer, _text_split(args.text, "calibration", None))
    scores, stats = layer_scores(model, calibration, args.metric, micro_batch=args.micro_batch,
                                 progress=not args.quiet, backend=args.backend)
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
    from .data import load_text, tokenize
    from .evaluation import perplexity

    limits = _model_limits(args)
    if args.seqlen < 2 or (limits.max_length is not None and args.seqlen > limits.max_length):
        raise ValueError(f"--seqlen: must be in [2, {limits.max_length}] (the model's maximum), got {args.seqlen}")
    if args.stride is not None and not 1 <= args.stride <= args.seqlen:
        raise ValueError(f"--stride: must be in [1, --seqlen={args.seqlen}] (unset: = seqlen), got {args.stride}")
    if args.tokens not in (0, None) and args.tokens < 2:
        raise ValueError(f"--tokens: must be 0 (all tokens) or >= 2, got {args.tokens}")
    zero_shot = None
    if args.tasks is not None:
        from .zeroshot import parse_tasks, task_config

        tasks = parse_tasks(args.tasks)  # bad names, missing lm_eval or data: fail before the model loads
        for task in tasks:
            task_config(task)
        if args.limit is not None and args.limit < 1:
            raise ValueError(f"--limit: must be >= 1, got {args.limit}")
        if args.batch_size < 1:
            raise ValueError(f"--batch-size: must be >= 1, got {args.batch_size}")
    elif args.no_ppl:
        raise ValueError("--no-ppl: nothing to evaluate without --tasks")
    text = None if args.no_ppl else load_text(args.text, _text_split(args.text, "test", None))
    model, tokenizer = _load(args)
    r = None
    if text is not None:
        ids = tokenize(tokenizer, text)
        r = perplexity(model, ids, seqlen=args.seqlen, stride=args.stride, max_tokens=args.tokens or None,
                       progress=not args.quiet)
    if args.tasks is not None:
        from .zeroshot import evaluate_zero_shot

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
        from .zeroshot import format_table

        print(format_table(zero_shot))
    return 0


def cmd_env(args) -> int:
    from .env import environment_report, format_report

    report = environment_report()
    print(json.dumps(report, indent=1) if args.json else format_report(report))
    return 0


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
        return {"prune": cmd_prune, "score": cmd_score, "eval": cmd_eval, "env": cmd_env}[args.command](args)
    except (ValueError, OSError, ImportError) as exc:
        message = " ".join(str(exc).split()) or type(exc).__name__
        print(f"gradmap: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gradmap: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
