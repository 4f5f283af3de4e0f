"""CPU benchmark: the native stage-2 ops vs their PyTorch references (gradmap.projection): time and peak memory.

Shapes: the bundled model (SmolLM2-135M: hidden d=576, FFN 1536) and a 4096-wide model (7B class: d=4096,
FFN 11008). fold_projection_: down_proj weight [d, FFN] (bf16) folded with T [d, d] fp64. gram_accumulate_: X, Y
[tokens, d] bf16 into fp64 G, C. The 4096-wide Gram case is measured on ``--gram-tokens-4096`` tokens (default 8192,
1/8 of the 64k tokens a 256-window × 256-token calibration set streams; time is linear in tokens, and the
reference's extra memory is too (X and Y converted whole to fp64), while the op's is constant).

Time: op and reference alternate in this process, ``--repeats`` times each after one warm-up call; seconds = best
(CPU shared with other jobs: the minimum is the least disturbed run); ratio = reference / op (> 1: op faster).
Peak memory: each (case, implementation) runs once in a fresh subprocess; after the inputs exist the Linux peak-RSS
counter is reset (``/proc/self/clear_refs`` ← 5) and ``VmHWM − VmRSS`` after the call is the extra memory the call
needed at its peak (bytes; includes BLAS work buffers). Ratio = reference / op (> 1: op uses less).

Writes a table to stdout and the rows to ``--out`` (default docs/bench_ops.json, or docs/bench_ops_threads<N>.json
for N ≠ 1).

    PYTHONPATH=$PWD python3 benchmarks/bench_ops.py --threads 1
    PYTHONPATH=$PWD python3 benchmarks/bench_ops.py --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

import torch

from gradmap import ops
from gradmap.projection import fold_projection_reference, gram_accumulate_reference

DOCS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "docs")


def cases(gram_tokens_4096: int) -> list[tuple[str, str, tuple[int, int]]]:
    """(op, label, shape): fold shape = (d, FFN) of down_proj; Gram shape = (tokens, d), Y as wide as X."""
    return [("fold_projection_", "bundled 576x1536", (576, 1536)),
            ("fold_projection_", "4096x11008", (4096, 11008)),
            ("gram_accumulate_", "bundled 4096 tok x 576", (4096, 576)),
            ("gram_accumulate_", f"4096-wide {gram_tokens_4096} tok x 4096", (gram_tokens_4096, 4096))]


def make_call(op: str, shape: tuple[int, int], impl: str):
    """Build the inputs of one case (seed 0) and return (call, result): call() runs the op once from fresh inputs."""
    if impl == "op" and ops.backend("cpu") != "cpp":  # also loads (or compiles) the library in a fresh process
        raise SystemExit(f"native ops not loaded ({ops.unavailable_reason()}): build them first (README)")
    torch.manual_seed(0)
    if op == "fold_projection_":
        d, ffn = shape
        W = torch.randn(d, ffn).to(torch.bfloat16)
        T = torch.eye(d, dtype=torch.float64) + 0.01 * torch.randn(d, d, dtype=torch.float64)
        work = W.clone()
        fn = torch.ops.gradmap.fold_projection_ if impl == "op" else fold_projection_reference
        return (lambda: (work.copy_(W), fn(work, T))), (lambda: work)
    n, d = shape
    X = torch.randn(n, d).to(torch.bfloat16)
    Y = torch.randn(n, d).to(torch.bfloat16)
    G, C = torch.zeros(d, d, dtype=torch.float64), torch.zeros(d, d, dtype=torch.float64)
    fn = torch.ops.gradmap.gram_accumulate_ if impl == "op" else gram_accumulate_reference
    return (lambda: (G.zero_(), C.zero_(), fn(G, C, X, Y))), (lambda: torch.cat([G, C], 1))


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_extra_bytes(op: str, shape: tuple[int, int], impl: str) -> int:
    """In this (fresh) process: bytes of resident memory one call adds at its peak over what its inputs hold."""
    call, _ = make_call(op, shape, impl)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS (Linux >= 4.0)
    before = _status_kib("VmRSS")
    call()
    return (_status_kib("VmHWM") - before) * 1024


def measure_memory(op: str, shape: tuple[int, int], impl: str, threads: int) -> int:
    here = os.path.dirname(os.path.abspath(__file__))
    code = (f"import torch; torch.set_num_threads({threads}); import sys; sys.path.insert(0, {here!r}); "
            f"import bench_ops; print(bench_ops.peak_extra_bytes({op!r}, {tuple(shape)!r}, {impl!r}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def timed(call) -> float:
    """Seconds (wall clock) of one call."""
    t0 = time.perf_counter()
    call()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    ap.add_argument("--repeats", type=int, default=3, help="timed calls per implementation (default 3)")
    ap.add_argument("--gram-tokens-4096", type=int, default=8192)
    ap.add_argument("--only", default="", help="run only cases whose label contains this text")
    ap.add_argument("--out", default=None, help="JSON path (default docs/bench_ops[_threads<N>].json)")
    args = ap.parse_args()
    if ops.backend("cpu") != "cpp":
        raise SystemExit(f"native ops not loaded ({ops.unavailable_reason()}): build them first (README)")
    out_path = args.out or os.path.join(DOCS, "bench_ops.json" if args.threads == 1
                                        else f"bench_ops_threads{args.threads}.json")
    torch.set_num_threads(args.threads)
    rows = []
    for op, label, shape in cases(args.gram_tokens_4096):
        if args.only not in label:
            continue
        op_call, op_result = make_call(op, shape, "op")
        ref_call, ref_result = make_call(op, shape, "reference")
        op_call(), ref_call()  # warm-up (first-call allocations, BLAS initialisation)
        err = float((op_result().double() - ref_result().double()).abs().max())
        t_op, t_ref = float("inf"), float("inf")
        for _ in range(args.repeats):  # alternate, so both see the same machine load
            t_op, t_ref = min(t_op, timed(op_call)), min(t_ref, timed(ref_call))
        del op_call, ref_call, op_result, ref_result
        m_op = measure_memory(op, shape, "op", args.threads)
        m_ref = measure_memory(op, shape, "reference", args.threads)
        rows.append({"op": op, "case": label, "shape": list(shape), "op_seconds": t_op, "reference_seconds": t_ref,
                     "ratio_reference_over_op": t_ref / t_op, "op_peak_extra_bytes": m_op,
                     "reference_peak_extra_bytes": m_ref,
                     "memory_ratio_reference_over_op": m_ref / max(m_op, 1), "max_abs_diff": err})
        print(f"{op:18s} {label:30s} op {t_op:7.3f} s  ref {t_ref:7.3f} s  ref/op {t_ref / t_op:5.2f}   "
              f"peak extra op {m_op / 2**20:7.1f} MiB  ref {m_ref / 2**20:7.1f} MiB  ref/op "
              f"{m_ref / max(m_op, 1):6.2f}   max|diff| {err:.2e}", flush=True)
    report = {"threads": args.threads, "repeats": args.repeats, "torch": torch.__version__,
              "blas": "MKL" if torch.backends.mkl.is_available() else "other",
              "cpu": platform.processor() or platform.machine(), "backend": ops.backend("cpu"),
              "note": "seconds = best of repeats (op and reference alternating, one process); peak extra bytes = "
                      "VmHWM - VmRSS around one call in a fresh process; ratios reference/op > 1 mean the op is "
                      "faster / uses less memory",
              "rows": rows}
    if not args.only:
        with open(out_path, "w") as f:
            json.dump(report, f, indent=1)
        print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
