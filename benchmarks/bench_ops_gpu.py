"""GPU benchmark: the CUDA stage-2 ops (cuBLAS GEMMs over streamed panels) vs the torch references on CUDA, and
end-to-end stage-2 time on one 7B-shaped layer.

It checks its own results against the references before timing, so a wrong kernel fails loudly (exit status 1)
instead of printing a speed. The references (gradmap.projection.*_reference) convert whole operands to fp64 and run
one torch GEMM; the ops convert panels (memory independent of the token count / weight width).

Cases (bf16 activations/weights, as stage 2 uses them):
  * fold_projection_: down_proj weight [4096, 11008] with T [4096, 4096] (fp64 and fp32 T).
  * gram_accumulate_: 64k tokens x 4096 streamed in micro-batches of 8 x 2048 tokens, fp64 and fp32 G/C (fp64
    accumulation for both, the same rule as on the CPU).
  * stage 2 end to end for one layer: stream the Gram statistics, solve the ridge, fold: native ops vs references.

Time: CUDA events, best of 3 after a warm-up. Peak: torch.cuda.max_memory_allocated above the allocation before the
call (bytes). Ratios reference/op > 1: the op is faster / needs less memory.

    python3 benchmarks/bench_ops_gpu.py [--tokens 65536] [--out docs/bench_ops_gpu.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from gradmap import ops
from gradmap.projection import (fold_projection_reference, gram_accumulate_reference, solve_ridge)


def cuda_time(fn, repeats: int = 3) -> float:
    """Best-of-``repeats`` seconds of ``fn`` measured with CUDA events (after one warm-up call)."""
    fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(end) / 1000.0)
    return best


def cuda_peak(fn) -> int:
    """Bytes ``fn`` allocates on the current CUDA device at its peak, above what was allocated before the call."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=65536)
    ap.add_argument("--micro-tokens", type=int, default=8 * 2048)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "docs", "bench_ops_gpu.json"))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_ops_gpu: no CUDA device visible", file=sys.stderr)
        return 2
    if ops.backend("cuda") != "cuda":
        raise SystemExit(f"CUDA ops not loaded (backend {ops.backend('cuda')!r}): build with a CUDA torch (README)")
    dev = torch.device("cuda")
    torch.manual_seed(0)
    fold, gram = torch.ops.gradmap.fold_projection_, torch.ops.gradmap.gram_accumulate_
    rows, failures = [], []

    def record(name, op_fn, ref_fn, err, tol, repeats=3):
        t_op, t_ref = cuda_time(op_fn, repeats), cuda_time(ref_fn, repeats)
        m_op, m_ref = cuda_peak(op_fn), cuda_peak(ref_fn)
        ok = err <= tol
        rows.append({"case": name, "op_seconds": t_op, "reference_seconds": t_ref, "ratio_reference_over_op":
                     t_ref / t_op, "op_peak_bytes": m_op, "reference_peak_bytes": m_ref,
                     "memory_ratio_reference_over_op": m_ref / max(m_op, 1), "max_abs_diff": err, "tolerance": tol,
                     "ok": ok})
        if not ok:
            failures.append(f"{name}: max|diff| {err:.3e} > {tol:.3e}")
        print(f"{name:44s} op {t_op * 1e3:9.2f} ms  ref {t_ref * 1e3:9.2f} ms  ref/op {t_ref / t_op:5.2f}  "
              f"peak op {m_op / 2**20:8.1f} MiB ref {m_ref / 2**20:8.1f} MiB  max|diff| {err:.2e} "
              f"{'ok' if ok else 'FAILED'}", flush=True)

    d, ffn = 4096, 11008
    W = torch.randn(d, ffn, device=dev).to(torch.bfloat16)
    for tdtype in (torch.float64, torch.float32):
        T = (torch.eye(d, device=dev, dtype=torch.float64) + 0.01 * torch.randn(d, d, device=dev,
                                                                                dtype=torch.float64)).to(tdtype)
        w_op, w_ref = W.clone(), W.clone()
        fold(w_op, T)
        fold_projection_reference(w_ref, T)  # fp64
        # bf16 results: at most one bf16 rounding step apart where the fp64/fp32 sums straddle a rounding boundary
        # (2^-7 relative just above a power of two; measured 7.8e-3 with fp32 T): tolerance 2^-6, twice that
        err = float(((w_op.float() - w_ref.float()).abs() / (w_ref.float().abs() + 1e-2)).max())
        record(f"fold 4096x11008 bf16, T {str(tdtype)[6:]}", lambda: fold(W.clone(), T),
               lambda: fold_projection_reference(W.clone(), T), err, 2.0**-6)

    micro = min(args.micro_tokens, args.tokens)
    X = torch.randn(micro, d, device=dev).to(torch.bfloat16)
    Y = torch.randn(micro, d, device=dev).to(torch.bfloat16)
    steps = max(1, args.tokens // micro)
    for gdtype in (torch.float64, torch.float32):
        G1, C1 = torch.zeros(d, d, device=dev, dtype=gdtype), torch.zeros(d, d, device=dev, dtype=gdtype)
        G2, C2 = G1.clone(), C1.clone()
        gram(G1, C1, X, Y)
        gram_accumulate_reference(G2, C2, X, Y)
        err = float(max((G1 - G2).abs().max(), (C1 - C2).abs().max()))
        # both accumulate in fp64: fp64 G/C differ by summation order; fp32 G/C by one fp32 rounding of the sum
        tol = (1e-12 if gdtype == torch.float64 else 2.0**-23) * float(G2.abs().max())

        def op_stream(G=G1, C=C1):
            for _ in range(steps):
                gram(G, C, X, Y)

        def ref_stream(G=G2, C=C2):
            for _ in range(steps):
                gram_accumulate_reference(G, C, X, Y)

        record(f"gram {steps * micro} tok x 4096, G {str(gdtype)[6:]}", op_stream, ref_stream, err, tol, repeats=2)

    # end-to-end stage 2 for one 7B-shaped layer (statistics + ridge solve + fold), on the same activations
    def stage2(native: bool):
        G = torch.zeros(d, d, device=dev, dtype=torch.float64)
        C = torch.zeros(d, d, device=dev, dtype=torch.float64)
        for _ in range(steps):
            (gram if native else gram_accumulate_reference)(G, C, X, Y)
        T = solve_ridge(G, C, 1e-2)
        w = W.clone()
        (fold if native else fold_projection_reference)(w, T)
        return w

    w_native, w_ref = stage2(True).float(), stage2(False).float()
    err = float(((w_native - w_ref).abs() / (w_ref.abs() + 1e-2)).max())
    record(f"stage 2, one layer, {steps * micro} tokens", lambda: stage2(True), lambda: stage2(False), err, 2.0**-6,
           repeats=1)
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda,
              "rows": rows, "failures": failures}
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    if failures:
        print("FAILED: " + "; ".join(failures), file=sys.stderr)
        return 1
    print("all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
