"""Cost of one GradMAP scoring step (stage 1) in time and peak memory, against references run in the same process.

Same model, same calibration batch, one process. Passes measured:

* ``forward (no grad)``: the model's own forward with full logits (:func:`lm_loss_sum` here) under ``torch.no_grad()``, the time unit ("x forward").
* ``scoring (<metric>)``: :func:`gradmap.methods.metrics.score_layers` (the layer engine) for each metric.
* ``naive backward (stored .grad)``: the same loss, ``backward()`` with every decoder-layer 2-D weight's ``.grad``
  stored and held until the end of the step, as in a training step (what :func:`reference_layer_scores` does before
  reducing).
* ``backward, weight grads freed at once``: as the naive backward, but a post-accumulate-grad hook frees each ``.grad``
  as soon as it is made: the floor for any exact weight-gradient score without recomputation (it still keeps every
  linear layer's input for the backward, which the no-weight-grad backward does not).
* ``backward, no weight grads``: no parameter requires grad; the embedding output is made a leaf that requires grad
  (forward hook), so the backward computes only activation gradients. The memory unit ("x no-weight-grad").

Time: best of ``--repeats`` rounds, the passes interleaved within each round so that load from other processes hits
them alike; the memory run of each pass comes first and serves as its warm-up. On a machine shared with other jobs
pass ``--threads 1``: with more OpenMP threads than free cores every parallel op waits on a descheduled thread (a
forward ran 15x slower with 2 threads than with 1 on 2 busy cores), which swamps the ratios.

Peak memory: CPU bytes allocated by torch above what was allocated before the step. Measured with
``torch.profiler.profile(profile_memory=True)``: torch's CPU allocator reports every allocation and free made while
the profiler is on as a ``[memory]`` event with a signed byte count; the running sum of those events, in time order,
is the memory allocated since the step began, and its maximum is the peak (:func:`peak_memory`). Frees of blocks
allocated before the step are not reported (torch warns "Memory block of unknown size"), so the peak is an upper
bound in that case. Memory outside torch's allocator (BLAS/oneDNN scratch, Python objects) is not counted. The method
is checked on known allocations before anything is measured (:func:`self_check`), and the naive backward must end
holding exactly the weight-gradient bytes. ``ru_maxrss`` is printed for context only (glibc caching makes RSS
useless for per-step peaks).

Targets (from the issue): scoring time <= 3.5x forward; scoring peak <= 1.1x the no-weight-grad backward's peak;
(peak_naive - peak_scoring) / weight_grad_bytes >= 90 %, weight_grad_bytes being the decoder layers' 2-D weights.
The naive backward accumulates its gradients while the saved activations are being freed, so its peak exceeds the
scoring peak only where the gradients outweigh the activations (tiny batches); where the peak is set at the start of
the backward, before any weight gradient exists, the last ratio reads about 0 whatever the scoring does. "held after"
(what the step leaves allocated) and the freed-grads row show what the hooks buy.

    python benchmarks/bench_scoring.py --out docs/bench_scoring.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import time

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from gradmap.adapters import get_adapter
from gradmap.data import build_calibration, load_text
from gradmap.models import load_model
from gradmap.report import environment
from gradmap.methods.metrics import layer_matrices, score_layers
from gradmap.names import METRICS


def lm_loss_sum(model, input_ids, attention_mask):
    """The model's own forward and summed next-token cross-entropy (full logits): the reference pass."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    valid = (attention_mask[:, 1:] * attention_mask[:, :-1]).bool()
    targets = input_ids[:, 1:].masked_fill(~valid, -100)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(),
                                             ignore_index=-100, reduction="sum")
    return loss, int(valid.sum())


def num_targets(calibration) -> int:
    return calibration.num_targets


@contextlib.contextmanager
def _only_grad(model, params):
    """Temporarily make ``params`` the only parameters that require grad (flags restored, grads cleared)."""
    saved = [(p, p.requires_grad) for p in model.parameters()]
    keep = {id(p) for p in params}
    try:
        for p in model.parameters():
            p.requires_grad_(id(p) in keep)
            p.grad = None
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)
            p.grad = None

MIB = 2**20
FORWARD = "forward (no grad)"
NAIVE = "naive backward (stored .grad)"
FREED = "backward, weight grads freed at once"
NO_WEIGHT_GRAD = "backward, no weight grads"


def peak_memory(fn):
    """Run ``fn()`` and measure the CPU memory torch allocates meanwhile.

    Returns:
        ``(result, peak_bytes, held_bytes)``: ``fn``'s result; the highest running total of bytes allocated minus
        bytes freed since the call began; that total at the end (what ``result`` and anything else still alive hold).
    """
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and e.device_type() == DeviceType.CPU]
    total = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        total += e.nbytes()
        peak = max(peak, total)
    return result, peak, total


def self_check(tolerance: float = 0.05) -> dict:
    """Check :func:`peak_memory` on known allocations; raise ``RuntimeError`` if a reading is off by > ``tolerance``.

    Cases: one 100 MiB tensor kept (peak 100, held 100); two 50 MiB tensors allocated and freed in turn (peak 50,
    held 0); a 10 MiB tensor freed inside a step that allocates 20 MiB first (peak 30, held 20).
    """
    def one():
        return torch.ones(100 * MIB, dtype=torch.uint8)

    def two_in_turn():
        for _ in range(2):
            x = torch.ones(50 * MIB, dtype=torch.uint8)
            del x

    def overlap():
        a = torch.ones(20 * MIB, dtype=torch.uint8)
        b = torch.ones(10 * MIB, dtype=torch.uint8)
        del b
        return a

    readings = {}
    for name, fn, want_peak, want_held in [("keep 100 MiB", one, 100, 100), ("2 x 50 MiB in turn", two_in_turn, 50, 0),
                                           ("20 MiB kept + 10 MiB freed", overlap, 30, 20)]:
        _, peak, held = peak_memory(fn)
        readings[name] = {"peak_mib": peak / MIB, "want_peak_mib": want_peak, "held_mib": held / MIB,
                          "want_held_mib": want_held}
        if abs(peak / MIB - want_peak) > tolerance * want_peak or abs(held / MIB - want_held) > tolerance * want_peak:
            raise RuntimeError(f"memory self-check failed on {name!r}: {readings[name]}")
    return readings


def make_passes(model, cal, micro_batch: int, metrics: list[str]) -> dict:
    """The passes to measure, each a no-argument callable over the whole calibration set (all its micro-batches)."""
    matrices = [p for layer in get_adapter(model).layers(model) for p in layer_matrices(layer)]
    total = num_targets(cal)
    batches = list(cal.batches(micro_batch))

    def forward():
        with torch.no_grad():
            return sum(float(lm_loss_sum(model, ids, mask)[0]) for ids, mask in batches)

    def naive_backward():
        with _only_grad(model, matrices):
            for ids, mask in batches:
                loss, _ = lm_loss_sum(model, ids, mask)
                (loss / total).backward()
            return [p.grad for p in matrices]  # held until the caller drops them, like a training step's grads

    def freed_grads_backward():
        def free(param):
            param.grad = None

        handles = [p.register_post_accumulate_grad_hook(free) for p in matrices]
        try:
            with _only_grad(model, matrices):
                for ids, mask in batches:
                    loss, _ = lm_loss_sum(model, ids, mask)
                    (loss / total).backward()
        finally:
            for h in handles:
                h.remove()

    def no_weight_grad_backward():
        handle = model.get_input_embeddings().register_forward_hook(lambda m, a, out: out.detach().requires_grad_())
        try:
            with _only_grad(model, []):
                for ids, mask in batches:
                    loss, _ = lm_loss_sum(model, ids, mask)
                    (loss / total).backward()
        finally:
            handle.remove()

    passes = {FORWARD: forward}
    for metric in metrics:
        passes[f"scoring ({metric})"] = lambda metric=metric: score_layers(model, cal, metric, micro_batch=micro_batch)
    passes[NAIVE] = naive_backward
    passes[FREED] = freed_grads_backward
    passes[NO_WEIGHT_GRAD] = no_weight_grad_backward
    return passes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--nsamples", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--metrics", default="taylor,grad_l1,grad_l2,gate")
    ap.add_argument("--repeats", type=int, default=3, help="timed rounds; the best time of each pass is reported")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch intra-op threads (0: torch's default); 1 is far steadier on a loaded machine")
    ap.add_argument("--out", default=None, help="write the numbers and the environment as JSON")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    metrics = args.metrics.split(",")
    for m in metrics:
        if m not in METRICS:
            ap.error(f"--metrics: {m!r} is not one of {', '.join(METRICS)}")

    checks = self_check()
    print("memory self-check: " + "; ".join(f"{k}: peak {v['peak_mib']:.1f}/{v['want_peak_mib']} MiB, held "
                                            f"{v['held_mib']:.1f}/{v['want_held_mib']} MiB" for k, v in checks.items()),
          flush=True)
    model, tok = load_model(args.model)
    cal = build_calibration(tok, load_text("wiki", "calibration"), nsamples=args.nsamples, seqlen=args.seqlen,
                            seed=args.seed)
    weight_grad_bytes = sum(p.numel() * p.element_size() for layer in get_adapter(model).layers(model)
                            for p in layer_matrices(layer))
    passes = make_passes(model, cal, args.micro_batch, metrics)

    rows = {}
    for name, fn in passes.items():  # memory first: this run is also the pass's warm-up
        result, peak, held = peak_memory(fn)
        del result
        rows[name] = {"pass": name, "peak_bytes": peak, "held_bytes": held, "times": []}
        print(f"{name}: peak {peak / MIB:.1f} MiB, held after {held / MIB:.1f} MiB", flush=True)
    naive_held = rows[NAIVE]["held_bytes"]
    if abs(naive_held - weight_grad_bytes) > 0.05 * weight_grad_bytes:
        raise RuntimeError(f"memory check failed: the naive backward holds {naive_held} bytes after the step, "
                           f"expected the weight gradients' {weight_grad_bytes}")
    for r in range(args.repeats):
        for name, fn in passes.items():
            t0 = time.perf_counter()
            fn()
            rows[name]["times"].append(time.perf_counter() - t0)
        print(f"round {r + 1}/{args.repeats}: " + ", ".join(f"{n} {v['times'][-1]:.2f} s" for n, v in rows.items()),
              flush=True)

    fwd = min(rows[FORWARD]["times"])
    nwg_peak = rows[NO_WEIGHT_GRAD]["peak_bytes"]
    for row in rows.values():
        row["seconds"] = min(row["times"])
        row["x_forward"] = row["seconds"] / fwd
        row["peak_mib"] = row["peak_bytes"] / MIB
        row["peak_x_no_weight_grad"] = row["peak_bytes"] / nwg_peak
    targets = []
    for m in metrics:
        row = rows[f"scoring ({m})"]
        saved = (rows[NAIVE]["peak_bytes"] - row["peak_bytes"]) / weight_grad_bytes
        targets.append({"metric": m, "x_forward": row["x_forward"], "time_ok": row["x_forward"] <= 3.5,
                        "peak_x_freed_grads": row["peak_bytes"] / rows[FREED]["peak_bytes"],
                        "peak_x_no_weight_grad": row["peak_x_no_weight_grad"],
                        "memory_ok": row["peak_x_no_weight_grad"] <= 1.1,
                        "weight_grad_saved": saved, "saved_ok": saved >= 0.9})
    maxrss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    print(f"\n{args.nsamples} x {args.seqlen} tokens, micro-batch {args.micro_batch}, "
          f"threads {torch.get_num_threads()}; weight gradients {weight_grad_bytes / MIB:.1f} MiB; "
          f"best of {args.repeats}\n")
    print("| pass | seconds | x forward | peak MiB | x no-weight-grad backward (peak) | held after MiB |")
    print("|---|---|---|---|---|---|")
    for r in rows.values():
        print(f"| {r['pass']} | {r['seconds']:.2f} | {r['x_forward']:.2f} | {r['peak_mib']:.1f} | "
              f"{r['peak_x_no_weight_grad']:.2f} | {r['held_bytes'] / MIB:.1f} |")
    print()
    for t in targets:
        ok = lambda flag: "ok" if flag else "MISSED"  # noqa: E731
        print(f"{t['metric']}: time {t['x_forward']:.2f}x forward (<= 3.5x: {ok(t['time_ok'])}); "
              f"peak {t['peak_x_no_weight_grad']:.2f}x no-weight-grad backward (<= 1.1x: {ok(t['memory_ok'])}); "
              f"weight-gradient bytes saved {100 * t['weight_grad_saved']:.1f} % (>= 90 %: {ok(t['saved_ok'])}); "
              f"peak {t['peak_x_freed_grads']:.2f}x the freed-grads backward")
    print(f"process ru_maxrss {maxrss_mib:.0f} MiB (context only)")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"settings": vars(args), "weight_grad_bytes": weight_grad_bytes, "rows": list(rows.values()),
                       "targets": targets, "memory_method": "torch.profiler profile_memory: running sum of CPU "
                       "[memory] events (bytes allocated minus freed since the step began)",
                       "memory_self_check": checks, "ru_maxrss_mib": maxrss_mib, "environment": environment()},
                      fh, indent=2)


if __name__ == "__main__":
    main()
