"""CPU benchmark: the native stage-2 ops vs their PyTorch references (gradmap.projection), one process, one run.

Shapes: the bundled model (SmolLM2-135M: hidden d=576, FFN 1536) and a 4096-wide model (7B class: d=4096,
FFN 11008). fold_projection_: down_proj weight [d, FFN] (bf16) folded with T [d, d] fp64. gram_accumulate_: X, Y
[tokens, d] bf16 into fp64 G, C. The 4096-wide Gram case is measured on ``--gram-tokens-4096`` tokens (default 2048
of the 64k a real calibration set streams; the cost is linear in tokens: scale the seconds by 32 for 64k).

Writes a table to stdout and rows to docs/bench_ops.json (seconds = best of ``--repeats``; ratio = reference / op).

    PYTHONPATH=$PWD python3 benchmarks/bench_ops.py --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch

from gradmap import ops
from gradmap.projection import fold_projection_reference, gram_accumulate_reference


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--gram-tokens-4096", type=int, default=2048)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "docs", "bench_ops.json"))
    args = ap.parse_args()
    if ops.backend("cpu") != "cpp":
        raise SystemExit(f"native ops not loaded ({ops.unavailable_reason()}): build them first (README)")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    op_fold, op_gram = torch.ops.gradmap.fold_projection_, torch.ops.gradmap.gram_accumulate_
    rows = []
    cases = [("fold_projection_", "bundled 576x1536", (576, 1536)),
             ("fold_projection_", "4096x11008", (4096, 11008)),
             ("gram_accumulate_", "bundled 4096 tok x 576", (4096, 576)),
             ("gram_accumulate_", f"4096-wide {args.gram_tokens_4096} tok x 4096", (args.gram_tokens_4096, 4096))]
    for op, label, shape in cases:
        if op == "fold_projection_":
            d, ffn = shape
            W = torch.randn(d, ffn).to(torch.bfloat16)
            T = torch.eye(d, dtype=torch.float64) + 0.01 * torch.randn(d, d, dtype=torch.float64)
            w_op, w_ref = W.clone(), W.clone()
            t_op = best_of(lambda: (w_op.copy_(W), op_fold(w_op, T)), args.repeats)
            t_ref = best_of(lambda: (w_ref.copy_(W), fold_projection_reference(w_ref, T)), args.repeats)
            err = float((w_op.double() - w_ref.double()).abs().max())
        else:
            n, d = shape
            X = torch.randn(n, d).to(torch.bfloat16)
            Y = torch.randn(n, d).to(torch.bfloat16)
            G1, C1 = torch.zeros(d, d, dtype=torch.float64), torch.zeros(d, d, dtype=torch.float64)
            G2, C2 = G1.clone(), C1.clone()
            t_op = best_of(lambda: (G1.zero_(), C1.zero_(), op_gram(G1, C1, X, Y)), args.repeats)
            t_ref = best_of(lambda: (G2.zero_(), C2.zero_(), gram_accumulate_reference(G2, C2, X, Y)), args.repeats)
            err = float(max((G1 - G2).abs().max(), (C1 - C2).abs().max()))
        rows.append({"op": op, "case": label, "shape": list(shape), "op_seconds": t_op, "reference_seconds": t_ref,
                     "ratio_reference_over_op": t_ref / t_op, "max_abs_diff": err})
        print(f"{op:18s} {label:32s} op {t_op:8.3f} s   reference {t_ref:8.3f} s   ref/op {t_ref / t_op:5.2f}   "
              f"max|diff| {err:.2e}", flush=True)
    report = {"threads": args.threads, "repeats": args.repeats, "torch": torch.__version__,
              "cpu": platform.processor() or platform.machine(), "backend": ops.backend("cpu"),
              "note": "seconds = best of repeats; ratio > 1 means the native op is faster than the PyTorch reference",
              "rows": rows}
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
