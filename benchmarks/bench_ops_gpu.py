"""GPU benchmark: the CUDA stage-2 ops vs torch on CUDA, and end-to-end stage-2 time on one 7B-shaped layer.

NOT RUN in the session that wrote it (no GPU was lent); it checks its own results against the references before
timing, so a wrong kernel fails loudly instead of printing a speed.

Cases (bf16 activations/weights, fp64 T and statistics, as stage 2 uses them):
  * fold_projection_: down_proj weight [4096, 11008] with T [4096, 4096] (fp64 and fp32 T).
  * gram_accumulate_: 64k tokens x 4096 streamed in micro-batches of 8 x 2048 tokens, fp64 and fp32 G/C.
  * stage 2 end to end for one layer: stream the Gram statistics, solve the ridge, fold: native ops vs references.

    python3 benchmarks/bench_ops_gpu.py [--tokens 65536] [--out docs/bench_ops_gpu.json]
"""

from __future__ import annotations

import argparse
import json
import os

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=65536)
    ap.add_argument("--micro-tokens", type=int, default=8 * 2048)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "docs", "bench_ops_gpu.json"))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device visible")
    if ops.backend("cuda") != "cuda":
        raise SystemExit(f"CUDA ops not loaded (backend {ops.backend('cuda')!r}): build with a CUDA torch (README)")
    dev = torch.device("cuda")
    torch.manual_seed(0)
    fold, gram = torch.ops.gradmap.fold_projection_, torch.ops.gradmap.gram_accumulate_
    rows = []

    def record(name, t_op, t_ref, err):
        rows.append({"case": name, "op_seconds": t_op, "reference_seconds": t_ref, "ratio_reference_over_op":
                     t_ref / t_op, "max_abs_diff": err})
        print(f"{name:44s} op {t_op * 1e3:9.2f} ms  torch {t_ref * 1e3:9.2f} ms  torch/op {t_ref / t_op:5.2f}  "
              f"max|diff| {err:.2e}", flush=True)

    d, ffn = 4096, 11008
    W = torch.randn(d, ffn, device=dev).to(torch.bfloat16)
    for tdtype in (torch.float64, torch.float32):
        T = (torch.eye(d, device=dev, dtype=torch.float64) + 0.01 * torch.randn(d, d, device=dev,
                                                                                dtype=torch.float64)).to(tdtype)
        w_op, w_ref = W.clone(), W.clone()
        fold(w_op, T)
        fold_projection_reference(w_ref, T)
        err = float((w_op.float() - w_ref.float()).abs().max())
        assert torch.allclose(w_op.float(), w_ref.float(), rtol=1e-2, atol=1e-2), err
        record(f"fold 4096x11008 bf16, T {str(tdtype)[6:]}", cuda_time(lambda: fold(W.clone(), T)),
               cuda_time(lambda: fold_projection_reference(W.clone(), T)), err)

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
        tol = 1e-6 * float(G2.abs().max()) if gdtype == torch.float64 else 1e-3 * float(G2.abs().max())
        assert err <= tol, (err, tol)

        def op_stream(G=G1, C=C1):
            for _ in range(steps):
                gram(G, C, X, Y)

        def ref_stream(G=G2, C=C2):
            for _ in range(steps):
                gram_accumulate_reference(G, C, X, Y)

        record(f"gram {steps * micro} tok x 4096, G {str(gdtype)[6:]}", cuda_time(op_stream, 2),
               cuda_time(ref_stream, 2), err)

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

    err = float((stage2(True).float() - stage2(False).float()).abs().max())
    record(f"stage 2, one layer, {steps * micro} tokens", cuda_time(lambda: stage2(True), 1),
           cuda_time(lambda: stage2(False), 1), err)
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda,
              "rows": rows}
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
