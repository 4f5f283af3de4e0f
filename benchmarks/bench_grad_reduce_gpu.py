"""GPU check and benchmark of the fused weight-gradient reduction kernel (``gradmap::linear_grad_reduce``, Triton).

For a linear layer ``y = x Wᵀ`` (``W: [out, in]``) and ``T`` tokens, the kernel computes ``dW = dyᵀ x`` tile by tile
and reduces each tile into Σ|dW|, Σ dW², Σ|W⊙dW| without writing dW. This script, on one CUDA device:

1. Correctness: against an fp64 reference (materialized dW) on ragged shapes with and without a token mask in
   fp32/fp16/bf16, and on every benchmark shape at the smallest token count in ``--dtype``. Tolerances: rtol 1e-5
   (fp32) and 1e-4 (fp16/bf16: products exact in fp32, tensor-core fp32 accumulation).
2. Memory: ``torch.cuda.max_memory_allocated`` above the allocation before the call must stay below 1/8 of one dW in
   the input dtype (the kernel allocates only ``3 x tiles`` fp32 partials); the torch path's delta is shown beside.
3. Time (``triton.testing.do_bench``, median): the kernel against torch's own ``dyᵀ @ x`` (cuBLAS, output in the
   input dtype, as autograd makes a weight gradient) and against that matmul followed by the three reductions.
   Throughput = 2·T·out·in / time; "% of torch matmul" compares the kernel's throughput to the bare matmul's;
   ``ratio_torch_mm_reduce_over_fused`` (> 1: the kernel is faster) compares it with torch's full dW + reductions.

Shapes are ``out x in`` (both orientations of the rectangular ones) at 4k, 8k and 16k tokens by default.

    python benchmarks/bench_grad_reduce_gpu.py [--shapes 4096x4096,...] [--tokens 4096,8192,16384] [--dtype bf16]

Exits with status 2 and a message when CUDA is absent (or the Triton interpreter is on).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

DEFAULT_SHAPES = "4096x4096,4096x11008,11008x4096,8192x28672,28672x8192"
DEFAULT_TOKENS = "4096,8192,16384"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
RTOL = {torch.float32: 1e-5, torch.float16: 1e-4, torch.bfloat16: 1e-4}


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=DEFAULT_SHAPES, help="comma-separated OUTxIN weight shapes")
    ap.add_argument("--tokens", default=DEFAULT_TOKENS, help="comma-separated token counts")
    ap.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    ap.add_argument("--rep-ms", type=int, default=200, help="do_bench repetition time per measurement (ms)")
    ap.add_argument("--check-only", action="store_true", help="correctness and memory checks only, no timing")
    ap.add_argument("--out", default=None, help="write the results as JSON")
    args = ap.parse_args(argv)
    try:
        args.shape_list = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(",") if s]
        assert all(len(s) == 2 and min(s) > 0 for s in args.shape_list)
    except (ValueError, AssertionError):
        ap.error(f"--shapes: expected OUTxIN[,OUTxIN...] with positive integers, got {args.shapes!r}")
    try:
        args.token_list = [int(t) for t in args.tokens.split(",") if t]
        assert args.token_list and min(args.token_list) > 0
    except (ValueError, AssertionError):
        ap.error(f"--tokens: expected positive integers separated by commas, got {args.tokens!r}")
    return args


def require_cuda() -> None:
    """Exit with status 2 and a clear message unless a CUDA device and the compiled (not interpreted) Triton exist."""
    if os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes"):
        sys.exit("bench_grad_reduce_gpu: TRITON_INTERPRET is set; unset it (or set 0) to run the compiled kernel")
    if not torch.cuda.is_available():
        print(f"bench_grad_reduce_gpu: CUDA is not available (torch {torch.__version__}, built for CUDA "
              f"{torch.version.cuda}); this script needs an NVIDIA GPU and a CUDA build of torch with triton",
              file=sys.stderr)
        sys.exit(2)


def _inputs(t, out_f, in_f, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(t, in_f, device="cuda", dtype=dtype, generator=g)
    dy = torch.randn(t, out_f, device="cuda", dtype=dtype, generator=g) * 0.01
    w = torch.randn(out_f, in_f, device="cuda", dtype=dtype, generator=g) * 0.02
    return x, dy, w


def torch_reduce(x, dy, w):
    """torch's way: the whole dW from cuBLAS in the input dtype (as autograd makes it), then three fp32 reductions."""
    dw = dy.t() @ x
    return torch.stack([dw.abs().sum(dtype=torch.float32), dw.float().square().sum(),
                        (dw.float() * w.float()).abs().sum()])


def check_correctness(args, dtype) -> list[dict]:
    from gradmap.kernels import linear_grad_reduce, reference_linear_grad_reduce

    rows = []
    cases = [(1000, 300, 200, False), (1000, 300, 200, True), (77, 45, 123, True), (4097, 1000, 777, False)]
    for t, out_f, in_f, masked in cases:
        for dt in (torch.float32, torch.float16, torch.bfloat16):
            x, dy, w = _inputs(t, out_f, in_f, dt)
            mask = (torch.rand(t, device="cuda") > 0.3) if masked else None
            got = linear_grad_reduce(x, dy, w, mask, backend="triton")
            want = reference_linear_grad_reduce(x, dy, w, mask)
            err = ((got - want).abs() / want.abs()).max().item()
            rows.append({"tokens": t, "out": out_f, "in": in_f, "mask": masked, "dtype": str(dt), "max_rel_err": err,
                         "ok": err <= RTOL[dt]})
    for out_f, in_f in args.shape_list:
        t = min(args.token_list)
        x, dy, w = _inputs(t, out_f, in_f, dtype)
        got = linear_grad_reduce(x, dy, w, backend="triton")
        want = reference_linear_grad_reduce(x, dy, w)
        err = ((got - want).abs() / want.abs()).max().item()
        rows.append({"tokens": t, "out": out_f, "in": in_f, "mask": False, "dtype": str(dtype), "max_rel_err": err,
                     "ok": err <= RTOL[dtype]})
        del x, dy, w
        torch.cuda.empty_cache()
    for r in rows:
        print(f"check T={r['tokens']} {r['out']}x{r['in']} {r['dtype']} mask={r['mask']}: max rel err "
              f"{r['max_rel_err']:.2e} {'ok' if r['ok'] else 'FAILED'}", flush=True)
    return rows


def peak_delta(fn) -> int:
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    delta = torch.cuda.max_memory_allocated() - base
    del out
    return delta


def main(argv=None) -> int:
    args = parse_args(argv)
    require_cuda()
    import triton
    from triton.testing import do_bench

    from gradmap.kernels import linear_grad_reduce

    dtype = DTYPES[args.dtype]
    torch.backends.cuda.matmul.allow_tf32 = False
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, "
          f"dtype {args.dtype}", flush=True)
    checks = check_correctness(args, dtype)
    results = []
    failures = [c for c in checks if not c["ok"]]
    for out_f, in_f in args.shape_list:
        for t in args.token_list:
            x, dy, w = _inputs(t, out_f, in_f, dtype)
            fused = lambda: linear_grad_reduce(x, dy, w, backend="triton")  # noqa: E731
            fused()  # autotune outside the measurements
            dw_bytes = out_f * in_f * x.element_size()
            mem_fused = peak_delta(fused)
            mem_torch = peak_delta(lambda: torch_reduce(x, dy, w))
            row = {"out": out_f, "in": in_f, "tokens": t, "dW_MiB": dw_bytes / 2**20, "fused_peak_delta_bytes":
                   mem_fused, "torch_peak_delta_bytes": mem_torch, "memory_ok": mem_fused < dw_bytes / 8}
            if not row["memory_ok"]:
                failures.append(row)
            if not args.check_only:
                flops = 2.0 * t * out_f * in_f
                ms_fused = do_bench(fused, rep=args.rep_ms, return_mode="median")
                ms_mm = do_bench(lambda: dy.t() @ x, rep=args.rep_ms, return_mode="median")
                ms_mm_reduce = do_bench(lambda: torch_reduce(x, dy, w), rep=args.rep_ms, return_mode="median")
                row.update(ms_fused=ms_fused, ms_torch_mm=ms_mm, ms_torch_mm_reduce=ms_mm_reduce,
                           tflops_fused=flops / ms_fused / 1e9, tflops_torch_mm=flops / ms_mm / 1e9,
                           tflops_torch_mm_reduce=flops / ms_mm_reduce / 1e9, pct_of_torch_mm=100 * ms_mm / ms_fused,
                           ratio_torch_mm_reduce_over_fused=ms_mm_reduce / ms_fused,
                           memory_ratio_torch_over_fused=mem_torch / max(mem_fused, 1))
            results.append(row)
            print(json.dumps(row), flush=True)
            del x, dy, w
            torch.cuda.empty_cache()

    print(f"\n{torch.cuda.get_device_name()}, {args.dtype}; memory = peak allocation above the inputs\n")
    if args.check_only:
        print("| out x in | tokens | dW MiB | fused peak MiB | torch peak MiB |")
        print("|---|---|---|---|---|")
        for r in results:
            print(f"| {r['out']}x{r['in']} | {r['tokens']} | {r['dW_MiB']:.0f} | "
                  f"{r['fused_peak_delta_bytes'] / 2**20:.3f} | {r['torch_peak_delta_bytes'] / 2**20:.0f} |")
    else:
        print("| out x in | tokens | fused ms | fused TFLOP/s | torch mm TFLOP/s | % of torch mm | torch mm+reduce ms "
              "| fused peak MiB | torch peak MiB (dW MiB) |")
        print("|---|---|---|---|---|---|---|---|---|")
        for r in results:
            print(f"| {r['out']}x{r['in']} | {r['tokens']} | {r['ms_fused']:.3f} | {r['tflops_fused']:.0f} | "
                  f"{r['tflops_torch_mm']:.0f} | {r['pct_of_torch_mm']:.0f} % | {r['ms_torch_mm_reduce']:.3f} | "
                  f"{r['fused_peak_delta_bytes'] / 2**20:.3f} | {r['torch_peak_delta_bytes'] / 2**20:.0f} "
                  f"({r['dW_MiB']:.0f}) |")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"settings": {k: v for k, v in vars(args).items()}, "device": torch.cuda.get_device_name(),
                       "torch": torch.__version__, "triton": triton.__version__, "checks": checks,
                       "results": results}, fh, indent=2)
    if failures:
        print(f"FAILED: {len(failures)} check(s): {failures}", file=sys.stderr)
        return 1
    print("all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
