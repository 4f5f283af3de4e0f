"""Fused linear cross-entropy (gradmap.kernels.linear_cross_entropy) against full logits: peak memory and time.

Each case is one LM-loss call, forward and backward with respect to the hidden states (the head needs no gradient),
on random inputs of the given vocabulary size V, hidden size d and token count N:

* ``fused``: :func:`gradmap.kernels.linear_cross_entropy` at its default chunk size (256 MiB of fp32 logits per chunk).
* ``reference``: ``logits = h @ Wᵀ`` then ``F.cross_entropy(reduction="sum")`` and autograd
  (:func:`reference_linear_cross_entropy` with ``compute_dtype=float32``), the way an LM loss is usually computed.

Memory, in bytes:

* CPU: every case runs in a fresh subprocess. After building the inputs and one tiny warm-up call, the worker reads its
  resident set (``/proc/self/statm``) and its peak so far (``getrusage``), makes the one measured call, and reports
  ``peak RSS after - RSS before`` (the extra resident memory of the call, including the [N, d] input gradient both
  paths produce). The reference is skipped (and said so) when its three [N, V] fp32 tensors would not fit in
  ``--max-ref-bytes``.
* CUDA: ``torch.cuda.max_memory_allocated() - memory_allocated()`` before the call, in-process.

Time, in seconds: the measured call on the CPU (one call: the cases are large); the best of ``--repeats`` calls on
CUDA (after one warm-up call). Ratios fused / reference are taken from the same run. The fused loss and input
gradient are checked against the reference's in every case where both ran (relative differences are recorded).

``--sweep-chunks`` instead times the fused path at several chunk sizes (in-process) for one (V, d, N), to choose the
default chunk rule.

    python benchmarks/bench_loss.py --threads 2 --out docs/bench_loss.json
    python benchmarks/bench_loss.py --sweep-chunks --vocab 262144 --hidden 640 --tokens 512 --threads 2
    python benchmarks/bench_loss.py --device cuda --out docs/bench_loss_cuda.json      # on a GPU machine
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from gradmap.kernels.linear_cross_entropy import (default_chunk_size, linear_cross_entropy,  # noqa: E402
                                                  reference_linear_cross_entropy)

CPU_GRID = dict(vocab=(49152, 128256, 262144), hidden=(576, 640), tokens=(512, 2048))
CPU_EXTRA = [(262144, 640, 8192)]  # Gemma-3-270M at a realistic calibration batch (reference does not fit in RAM)
CUDA_GRID = dict(vocab=(49152, 128256, 262144), hidden=(576, 640, 4096), tokens=(2048, 8192, 32768))
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def make_inputs(vocab: int, hidden: int, tokens: int, dtype: torch.dtype, device: str, seed: int = 0):
    """Random hidden states [N, d] (requires grad), head [V, d] scaled so logits have unit-order spread, targets [N]
    with the last token of every 512 ignored (as in shifted next-token targets)."""
    g = torch.Generator(device).manual_seed(seed)
    # generated in place (normal_), so building the inputs leaves no temporary above the measured baseline
    w = torch.empty(vocab, hidden, dtype=dtype, device=device).normal_(0.0, hidden ** -0.5, generator=g)
    h = torch.empty(tokens, hidden, dtype=dtype, device=device).normal_(generator=g).requires_grad_(True)
    y = torch.randint(0, vocab, (tokens,), generator=g, device=device)
    y[511::512] = -100
    return h, w, y


def one_call(path: str, h, w, y, chunk_size=None):
    """Forward + backward w.r.t. h; returns (loss float, h.grad)."""
    h.grad = None
    if path == "fused":
        loss = linear_cross_entropy(h, w, y, chunk_size=chunk_size)
    else:
        loss = reference_linear_cross_entropy(h, w, y, compute_dtype=torch.float32)
    loss.backward()
    return loss.item(), h.grad


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def worker(args) -> None:
    """Run one CPU case in this (fresh) process and print a JSON line."""
    torch.manual_seed(0)
    dtype = DTYPES[args.dtype]
    h, w, y = make_inputs(args.vocab, args.hidden, args.tokens, dtype, "cpu")
    hs, ws, ys = make_inputs(1024, args.hidden, 64, dtype, "cpu", seed=1)  # warm-up: BLAS/allocator init
    one_call(args.path, hs, ws, ys)
    del hs, ws, ys
    rss0, peak0 = _rss_bytes(), _maxrss_bytes()
    t0 = time.perf_counter()
    loss, grad = one_call(args.path, h, w, y)
    seconds = time.perf_counter() - t0
    peak1 = _maxrss_bytes()
    out = dict(path=args.path, seconds=seconds, extra_peak_bytes=peak1 - rss0, peak_before_excess_bytes=peak0 - rss0,
               loss=loss, grad_path=None)
    if args.grad_file:
        torch.save(grad, args.grad_file)
        out["grad_path"] = args.grad_file
    print("RESULT " + json.dumps(out))


def run_worker(case: dict, path: str, args, grad_file: str | None) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--path", path, "--vocab", str(case["vocab"]),
           "--hidden", str(case["hidden"]), "--tokens", str(case["tokens"]), "--dtype", args.dtype,
           "--threads", str(args.threads)]
    if grad_file:
        cmd += ["--grad-file", grad_file]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"worker failed ({path}, {case}): {proc.stderr[-2000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def cpu_cases(args) -> list[dict]:
    cases = [dict(vocab=v, hidden=d, tokens=n) for v in CPU_GRID["vocab"] for d in CPU_GRID["hidden"]
             for n in CPU_GRID["tokens"]]
    cases += [dict(vocab=v, hidden=d, tokens=n) for v, d, n in CPU_EXTRA]
    return cases


def compare(loss_f, grad_f, loss_r, grad_r) -> dict:
    return dict(loss_rel_diff=abs(loss_f - loss_r) / max(abs(loss_r), 1e-30),
                grad_rel_diff=float((grad_f.float() - grad_r.float()).norm() / grad_r.float().norm().clamp_min(1e-30)))


def run_cpu(args) -> list[dict]:
    rows = []
    tmp = os.path.join("/tmp", f"bench_loss_{os.getpid()}")
    for case in cpu_cases(args):
        ref_bytes = 3 * case["tokens"] * case["vocab"] * 4
        fused = run_worker(case, "fused", args, tmp + "_f.pt")
        row = dict(case, dtype=args.dtype, chunk_rows=default_chunk_size(case["vocab"], case["tokens"]),
                   fused_seconds=fused["seconds"], fused_peak_bytes=fused["extra_peak_bytes"], fused_loss=fused["loss"])
        if ref_bytes > args.max_ref_bytes:
            row["reference"] = (f"skipped: its three [N, V] fp32 tensors need ~{ref_bytes / 2**30:.1f} GiB "
                                f"> --max-ref-bytes {args.max_ref_bytes / 2**30:.1f} GiB")
        else:
            ref = run_worker(case, "reference", args, tmp + "_r.pt")
            row.update(reference_seconds=ref["seconds"], reference_peak_bytes=ref["extra_peak_bytes"],
                       time_ratio=fused["seconds"] / ref["seconds"],
                       peak_ratio=fused["extra_peak_bytes"] / max(1, ref["extra_peak_bytes"]),
                       **compare(fused["loss"], torch.load(tmp + "_f.pt"), ref["loss"], torch.load(tmp + "_r.pt")))
        for key in ("_f.pt", "_r.pt"):
            if os.path.exists(tmp + key):
                os.remove(tmp + key)
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def run_cuda(args) -> list[dict]:
    rows = []
    dtype = DTYPES[args.dtype]
    free = torch.cuda.mem_get_info()[0]
    for v in CUDA_GRID["vocab"]:
        for d in CUDA_GRID["hidden"]:
            for n in CUDA_GRID["tokens"]:
                h, w, y = make_inputs(v, d, n, dtype, "cuda")
                row = dict(vocab=v, hidden=d, tokens=n, dtype=args.dtype,
                           chunk_rows=default_chunk_size(v, n, device="cuda", dtype=dtype))
                results = {}
                for path in ("fused", "reference"):
                    if path == "reference" and 3 * n * v * 4 > 0.8 * free:
                        row["reference"] = "skipped: full logits do not fit in GPU memory"
                        continue
                    one_call(path, h, w, y)  # warm-up (Triton compile, cuBLAS heuristics)
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    base = torch.cuda.memory_allocated()
                    best = float("inf")
                    for _ in range(args.repeats):
                        torch.cuda.synchronize()
                        t0 = time.perf_counter()
                        loss, grad = one_call(path, h, w, y)
                        torch.cuda.synchronize()
                        best = min(best, time.perf_counter() - t0)
                    results[path] = (loss, grad.clone())
                    row[f"{path}_seconds"] = best
                    row[f"{path}_peak_bytes"] = torch.cuda.max_memory_allocated() - base
                    h.grad = None
                if "reference" in results:
                    row.update(time_ratio=row["fused_seconds"] / row["reference_seconds"],
                               peak_ratio=row["fused_peak_bytes"] / max(1, row["reference_peak_bytes"]),
                               **compare(*results["fused"], *results["reference"]))
                print(json.dumps(row), flush=True)
                rows.append(row)
                del h, w, y, results
                torch.cuda.empty_cache()
    return rows


def sweep_chunks(args) -> list[dict]:
    """Fused time per chunk size for one (V, d, N), in-process (best of --repeats after one warm-up)."""
    dtype = DTYPES[args.dtype]
    h, w, y = make_inputs(args.vocab, args.hidden, args.tokens, dtype, args.device)
    rows = []
    for chunk in args.chunks:
        one_call("fused", h, w, y, chunk_size=chunk)
        best = float("inf")
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            one_call("fused", h, w, y, chunk_size=chunk)
            if args.device == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t0)
        row = dict(vocab=args.vocab, hidden=args.hidden, tokens=args.tokens, chunk_rows=chunk,
                   chunk_logits_bytes=chunk * args.vocab * 4, seconds=best,
                   microseconds_per_token=best / args.tokens * 1e6)
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = [("| V | d | N | chunk rows | fused peak (bytes) | reference peak (bytes) | peak ratio | fused s | "
              "reference s | time ratio | loss rel. diff |"),
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "reference_seconds" in r:
            ref = (f"{r['reference_peak_bytes']:,} | {r['peak_ratio']:.3f} | {r['fused_seconds']:.2f} | "
                   f"{r['reference_seconds']:.2f} | {r['time_ratio']:.2f} | {r['loss_rel_diff']:.1e}")
        else:
            ref = f"{r['reference']} | | {r['fused_seconds']:.2f} | | |"
        lines.append(f"| {r['vocab']:,} | {r['hidden']} | {r['tokens']:,} | {r['chunk_rows']} | "
                     f"{r['fused_peak_bytes']:,} | {ref} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--dtype", default="float32", choices=tuple(DTYPES))
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    ap.add_argument("--repeats", type=int, default=3, help="timed calls per case on CUDA / in --sweep-chunks")
    ap.add_argument("--max-ref-bytes", type=float, default=12 * 2**30,
                    help="skip the CPU reference when its three [N, V] fp32 tensors exceed this (bytes)")
    ap.add_argument("--out", default=None, help="write the rows (and the environment) to this JSON file")
    ap.add_argument("--sweep-chunks", action="store_true")
    ap.add_argument("--chunks", type=int, nargs="+", default=[32, 64, 128, 256, 512, 1024])
    ap.add_argument("--vocab", type=int, default=262144)
    ap.add_argument("--hidden", type=int, default=640)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--path", default="fused", choices=("fused", "reference"), help=argparse.SUPPRESS)
    ap.add_argument("--grad-file", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.worker:
        worker(args)
        return
    t0 = time.perf_counter()
    if args.sweep_chunks:
        rows = sweep_chunks(args)
        table = None
    else:
        rows = run_cuda(args) if args.device == "cuda" else run_cpu(args)
        table = markdown(rows)
        print(table)
    env = dict(torch=torch.__version__, python=platform.python_version(), machine=platform.machine(),
               cpu_count=os.cpu_count(), threads=torch.get_num_threads(), device=args.device,
               gpu=torch.cuda.get_device_name() if args.device == "cuda" else None,
               total_seconds=time.perf_counter() - t0)
    if args.out:
        payload = {}
        if os.path.exists(args.out):
            with open(args.out) as f:
                payload = json.load(f)
        key = "chunk_sweep" if args.sweep_chunks else f"{args.device}_{args.dtype}"
        payload[key] = dict(environment=env, rows=rows, **({"markdown": table} if table else {}))
        with open(args.out, "w") as f:
            json.dump(payload, f, indent=1)
        print(f"wrote {args.out} [{key}]")


if __name__ == "__main__":
    main()
