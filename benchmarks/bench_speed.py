"""Measured speed-up of a pruned checkpoint over the bundled default model (SmolLM2-135M-Instruct), same run.

Both models are loaded in the same process and measured with :func:`gradmap.speed.compare_speed` on the same seeded
input, their repeats interleaved (dense, pruned, dense, ...): prefill tokens/s (one forward over
``batch x prompt`` tokens without a KV cache), time to first token, and greedy decode tokens/s (KV cache on, every row
decodes exactly ``--new-tokens`` tokens). Medians over ``--repeats`` after one warm-up. The speed-up is the ratio
pruned / dense measured in this run, never a number compared across machines.

On a CPU shared with other jobs pass ``--threads 1`` (more OpenMP threads than free cores makes every op wait on a
descheduled thread, which swamps the ratio).

    python benchmarks/bench_speed.py OUT_DIR                         # OUT_DIR: a `gradmap prune` output directory
    python benchmarks/bench_speed.py OUT_DIR --device cuda --dtype bfloat16 --batch-size 8 --json speed.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from gradmap.models import DEFAULT_MODEL, load_model
from gradmap.speed import compare_speed


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("pruned", help="pruned checkpoint directory (a gradmap output)")
    p.add_argument("--dense", default=DEFAULT_MODEL, help="dense model directory (default: the bundled SmolLM2)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--json", type=Path, default=None, help="also write the full result to this JSON file")
    args = p.parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            p.error(f"--threads: must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    if not (Path(args.pruned) / "config.json").is_file():
        p.error(f"pruned: {args.pruned!r} is not a model directory (no config.json)")
    dense, tokenizer = load_model(args.dense, dtype=args.dtype)
    pruned, _ = load_model(args.pruned, dtype=args.dtype)
    try:
        r = compare_speed(dense, pruned, tokenizer, device=args.device, batch_size=args.batch_size,
                          prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens, repeats=args.repeats,
                          seed=args.seed)
    except ValueError as exc:
        p.error(str(exc))
    d = r["dense"]
    print(f"device {d['device']} ({d['device_name']}), {d['torch_threads']} torch threads, {d['dtype']}, "
          f"batch {d['batch_size']}, prompt {d['prompt_tokens']} tokens, {d['new_tokens']} new tokens, "
          f"median of {d['repeats']}")
    print(f"{'model':<8} {'layers':>6} {'params':>12} {'prefill tok/s':>14} {'TTFT s':>9} {'decode tok/s':>13}")
    for name in ("dense", "pruned"):
        m = r[name]
        print(f"{name:<8} {m['num_layers']:>6} {m['num_parameters']:>12,} {m['prefill_tokens_per_s']:>14.1f} "
              f"{m['time_to_first_token_s']:>9.4f} {m['decode_tokens_per_s']:>13.1f}")
    s = r["speedup"]
    print(f"speed-up (pruned / dense): prefill {s['prefill']:.3f}x, "
          f"time to first token {s['time_to_first_token']:.3f}x, decode {s['decode']:.3f}x")
    if args.json:
        args.json.write_text(json.dumps(r, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
