"""Fused weight-gradient scoring (gradmap.kernels, CPU chunked path) against the hook path and plain backwards.

Same model, same calibration batch, one process, one weight metric. Passes measured (the last four as in
``benchmarks/bench_scoring.py``, whose pass builders and memory helpers this script imports):

* ``scoring, fused (<backend>)``: :func:`gradmap.methods.metrics.score_layers` (``backend="fused"``): no parameter requires grad; every
  decoder-layer Linear reduces ``dW = dyᵀ x`` into its layer score inside its own backward, ``chunk_rows`` rows of dW
  at a time (``--chunk-rows``, 0 = about 2**18 elements per chunk); no weight gradient is materialized.
* ``scoring (<metric>)``: :func:`gradmap.methods.metrics.score_layers`: autograd makes each full weight gradient, a
  post-accumulate-grad hook reduces and frees it.
* ``naive backward (stored .grad)``, ``backward, weight grads freed at once``, ``backward, no weight grads``, and
  ``forward (no grad)`` (the time unit).

Time: best of ``--repeats`` rounds, passes interleaved within each round; the memory run of each pass comes first and
is its warm-up. Peak memory: CPU bytes allocated by torch above what was allocated before the step
(``bench_scoring.peak_memory``: running sum of the profiler's ``[memory]`` events; the method is checked by
``bench_scoring.self_check`` first).

Check before timing: the fused scores must equal exact scores (every stored fp32 ``.grad`` reduced in fp64) to rtol
1e-5. The hook path's error against the same exact scores is printed too: ``gradmap.methods.metrics.reduce_gradient`` uses
``torch.linalg.vector_norm``, which on the CPU accumulates fp32 without pairwise summation (relative error ~7e-5 at
the 0.9 M elements of one SmolLM2 MLP matrix, ~1e-3 at 4 M).

    python benchmarks/bench_grad_reduce.py --threads 1 --out docs/bench_grad_reduce.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_scoring import (FORWARD, FREED, MIB, NAIVE, NO_WEIGHT_GRAD, _only_grad, lm_loss_sum,  # noqa: E402
                           make_passes, num_targets, peak_memory, self_check)

from gradmap.adapters import get_adapter  # noqa: E402
from gradmap.data import build_calibration, load_text  # noqa: E402
from gradmap.models import load_model  # noqa: E402
from gradmap.report import environment  # noqa: E402
from gradmap.methods.metrics import layer_matrices, score_layers  # noqa: E402
from gradmap.names import WEIGHT_METRICS  # noqa: E402


def fused_layer_scores(model, cal, metric, *, micro_batch, backend, chunk_rows=0):
    """The fused backend's scores (the engine's reverse sweep), the reduction kernel forced by GRADMAP_GRAD_REDUCE
    (``chunk_rows`` is the kernel's automatic choice here)."""
    os.environ["GRADMAP_GRAD_REDUCE"] = backend
    try:
        return score_layers(model, cal, metric, micro_batch=micro_batch, backend="fused")
    finally:
        os.environ.pop("GRADMAP_GRAD_REDUCE", None)


def layer_scores(model, cal, metric, *, micro_batch):
    return score_layers(model, cal, metric, micro_batch=micro_batch)


def exact_scores(model, cal, metric: str, micro_batch: int) -> torch.Tensor:
    """Per-layer scores from stored fp32 weight gradients, every reduction in fp64 (the ground truth)."""
    layers = get_adapter(model).layers(model)
    params = [(i, p) for i, layer in enumerate(layers) for p in layer_matrices(layer)]
    total = num_targets(cal)
    acc = torch.zeros(len(layers), dtype=torch.float64)
    with _only_grad(model, [p for _, p in params]):
        for ids, mask in cal.batches(micro_batch):
            loss, _ = lm_loss_sum(model, ids, mask)
            (loss / total).backward()
            for i, p in params:
                g = p.grad.double()
                acc[i] += {"grad_l1": lambda: g.abs().sum(), "grad_l2": lambda: g.square().sum(),
                           "taylor": lambda: (g * p.detach().double()).abs().sum()}[metric]()
                p.grad = None
    return acc.float()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--metric", default="taylor", choices=WEIGHT_METRICS)
    ap.add_argument("--nsamples", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--backend", default="torch", choices=("torch", "triton", "auto"),
                    help="fused backend (triton on CPU needs TRITON_INTERPRET=1 and is very slow)")
    ap.add_argument("--chunk-rows", type=int, default=0, help="dW rows per chunk on the torch path (0: automatic)")
    ap.add_argument("--repeats", type=int, default=3, help="timed rounds; the best time of each pass is reported")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch intra-op threads (0: torch's default); 1 is far steadier on a loaded machine")
    ap.add_argument("--out", default=None, help="write the numbers and the environment as JSON")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    checks = self_check()
    print("memory self-check: " + "; ".join(f"{k}: peak {v['peak_mib']:.1f}/{v['want_peak_mib']} MiB"
                                            for k, v in checks.items()), flush=True)
    model, tok = load_model(args.model)
    cal = build_calibration(tok, load_text("wiki", "calibration"), nsamples=args.nsamples, seqlen=args.seqlen,
                            seed=args.seed)
    matrices = [p for layer in get_adapter(model).layers(model) for p in layer_matrices(layer)]
    weight_grad_bytes = sum(p.numel() * p.element_size() for p in matrices)
    largest_dw = max(p.numel() * 4 for p in matrices)

    fused_name = f"scoring, fused ({args.backend})"
    hooks_name = f"scoring ({args.metric})"
    base = make_passes(model, cal, args.micro_batch, [args.metric])
    passes = {FORWARD: base[FORWARD],
              fused_name: lambda: fused_layer_scores(model, cal, args.metric, micro_batch=args.micro_batch,
                                                     backend=args.backend, chunk_rows=args.chunk_rows),
              hooks_name: lambda: layer_scores(model, cal, args.metric, micro_batch=args.micro_batch),
              NAIVE: base[NAIVE], FREED: base[FREED], NO_WEIGHT_GRAD: base[NO_WEIGHT_GRAD]}

    rows = {}
    results = {}
    for name, fn in passes.items():  # memory first: this run is also the pass's warm-up
        result, peak, held = peak_memory(fn)
        if name in (fused_name, hooks_name):
            results[name] = result[0]
        del result
        rows[name] = {"pass": name, "peak_bytes": peak, "held_bytes": held, "times": []}
        print(f"{name}: peak {peak / MIB:.1f} MiB, held after {held / MIB:.1f} MiB", flush=True)
    exact = exact_scores(model, cal, args.metric, args.micro_batch)
    err = {name: ((results[name] - exact).abs() / exact.abs()).max().item() for name in (fused_name, hooks_name)}
    print(f"max relative error against exact fp64-reduced scores: fused {err[fused_name]:.2e}, "
          f"hooks {err[hooks_name]:.2e}", flush=True)
    if err[fused_name] > 1e-5:
        raise RuntimeError(f"fused scores differ from the exact scores (max relative error {err[fused_name]:.2e})")
    same_first = int(results[fused_name].argmin()) == int(exact.argmin())
    print(f"lowest-scoring layer: fused {int(results[fused_name].argmin())}, hooks "
          f"{int(results[hooks_name].argmin())}, exact {int(exact.argmin())}", flush=True)
    if not same_first:
        raise RuntimeError("the fused scores pick a different first layer to remove than the exact scores")
    if abs(rows[NAIVE]["held_bytes"] - weight_grad_bytes) > 0.05 * weight_grad_bytes:
        raise RuntimeError(f"memory check failed: the naive backward holds {rows[NAIVE]['held_bytes']} bytes after "
                           f"the step, expected the weight gradients' {weight_grad_bytes}")

    for r in range(args.repeats):
        for name, fn in passes.items():
            t0 = time.perf_counter()
            fn()
            rows[name]["times"].append(time.perf_counter() - t0)
        print(f"round {r + 1}/{args.repeats}: " + ", ".join(f"{n} {v['times'][-1]:.2f} s" for n, v in rows.items()),
              flush=True)

    fwd = min(rows[FORWARD]["times"])
    for row in rows.values():
        row["seconds"] = min(row["times"])
        row["x_forward"] = row["seconds"] / fwd
        row["x_hooks_time"] = row["seconds"] / min(rows[hooks_name]["times"])
        row["peak_mib"] = row["peak_bytes"] / MIB
        row["peak_x_no_weight_grad"] = row["peak_bytes"] / rows[NO_WEIGHT_GRAD]["peak_bytes"]
        row["peak_x_hooks"] = row["peak_bytes"] / rows[hooks_name]["peak_bytes"]
        row["held_mib"] = row["held_bytes"] / MIB

    print(f"\n{args.nsamples} x {args.seqlen} tokens, micro-batch {args.micro_batch}, metric {args.metric}, "
          f"threads {torch.get_num_threads()}, chunk_rows {args.chunk_rows or 'auto'}; all decoder weight gradients "
          f"{weight_grad_bytes / MIB:.1f} MiB, largest single dW {largest_dw / MIB:.2f} MiB; best of {args.repeats}\n")
    print("| pass | seconds | x forward | x hook scoring (time) | peak MiB | x no-weight-grad (peak) | "
          "x hook scoring (peak) | held after MiB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows.values():
        print(f"| {r['pass']} | {r['seconds']:.2f} | {r['x_forward']:.2f} | {r['x_hooks_time']:.2f} | "
              f"{r['peak_mib']:.1f} | {r['peak_x_no_weight_grad']:.3f} | {r['peak_x_hooks']:.3f} | "
              f"{r['held_mib']:.1f} |")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"settings": vars(args), "weight_grad_bytes": weight_grad_bytes, "largest_dw_bytes": largest_dw,
                       "max_rel_error_vs_exact": err, "rows": list(rows.values()), "memory_self_check": checks,
                       "environment": environment()}, fh, indent=2)


if __name__ == "__main__":
    main()
