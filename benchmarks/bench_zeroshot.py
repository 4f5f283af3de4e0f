"""Zero-shot scoring speed: shared-context scoring (gradmap.loglikelihood) vs lm-eval's own HFLM scoring, same items.

Both paths run lm-eval's tasks, tokenization and metrics on the same model and the same first ``--limit`` items of
each task, in this one process; the report gives, per task, the seconds of each path and their ratio (HFLM / shared),
the largest absolute difference of the per-choice log-likelihoods (nats) and whether every item's decision (acc,
acc_norm) is the same, and each path's peak memory in bytes above its start (``compare_methods.PeakMemory``: glibc
heap in use on CPU, ``torch.cuda.max_memory_allocated`` on CUDA) and the ratio. Versions and thread count are recorded.

    python3 benchmarks/bench_zeroshot.py --model default --limit 20 --threads 1 --out /tmp/bench_zeroshot.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from compare_methods import PeakMemory  # noqa: E402
from gradmap.models import load_model  # noqa: E402
from gradmap.zeroshot import TASKS, evaluate_zero_shot, parse_tasks  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default", help="bundled model name, HF directory or .gguf (default: default)")
    p.add_argument("--tasks", default=",".join(TASKS), help="comma-separated task names or 'all'")
    p.add_argument("--limit", type=int, default=20, help="items per task (first N of the validation split)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--batch-size", type=int, default=8, help="HFLM requests per forward pass")
    p.add_argument("--out", default=None, help="write the report as JSON here")
    args = p.parse_args(argv)
    if args.limit < 1:
        p.error("--limit: must be a positive integer")
    try:
        tasks = parse_tasks(args.tasks)
    except ValueError as exc:
        p.error(f"--tasks: {exc}")
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model)
    runs, peaks = {}, {}
    device = next(model.parameters()).device
    for name, shared in (("hflm", False), ("shared", True)):
        t0 = time.perf_counter()
        with PeakMemory(device) as mem:
            runs[name] = evaluate_zero_shot(model, tokenizer, tasks, limit=args.limit, batch_size=args.batch_size,
                                            log_samples=True, shared_context=shared)
        peaks[name] = mem.peak_bytes
        print(f"{name}: {time.perf_counter() - t0:.1f} s, peak {mem.peak_bytes} bytes", file=sys.stderr)
    report = {"model": args.model, "limit": args.limit, "threads": args.threads, "batch_size": args.batch_size,
              "versions": runs["shared"].versions, "python": platform.python_version(), "tasks": {},
              "hflm_peak_bytes": peaks["hflm"], "shared_peak_bytes": peaks["shared"],
              "peak_ratio": peaks["shared"] / peaks["hflm"] if peaks["hflm"] else None}
    for task in tasks:
        a, b = runs["hflm"].samples[task], runs["shared"].samples[task]
        diff = max(abs(x - y) for sa, sb in zip(a, b, strict=True)
                   for x, y in zip(sa["loglikelihoods"], sb["loglikelihoods"], strict=True))
        same = all(sa["acc"] == sb["acc"] and sa["acc_norm"] == sb["acc_norm"] for sa, sb in zip(a, b))
        sh, sf = runs["hflm"].tasks[task]["seconds"], runs["shared"].tasks[task]["seconds"]
        report["tasks"][task] = {"hflm_s": sh, "shared_s": sf, "ratio": sh / sf, "max_abs_ll_diff": diff,
                                 "same_decisions": same, "n": runs["shared"].tasks[task]["n"]}
    th, ts = runs["hflm"].seconds, runs["shared"].seconds
    report.update(hflm_s=th, shared_s=ts, ratio=th / ts)
    print(f"{'task':<14} {'n':>4} {'HFLM s':>8} {'shared s':>9} {'ratio':>6} {'max |dLL|':>10} same")
    for task, r in report["tasks"].items():
        print(f"{task:<14} {r['n']:>4} {r['hflm_s']:>8.1f} {r['shared_s']:>9.1f} {r['ratio']:>6.2f} "
              f"{r['max_abs_ll_diff']:>10.2e} {r['same_decisions']}")
    print(f"{'total':<14} {'':>4} {th:>8.1f} {ts:>9.1f} {th / ts:>6.2f}")
    print(f"peak bytes above start: HFLM {peaks['hflm']}, shared {peaks['shared']}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
