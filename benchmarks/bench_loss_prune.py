"""A whole prune with the fused linear cross-entropy against the same prune with full logits (``GRADMAP_LOSS=full``):
peak anonymous memory of the process (bytes, and as a multiple of the model's fp32 bytes), wall time per stage, the
removed layers and the perplexities, through the real command line in a subprocess.

    python benchmarks/bench_loss_prune.py --model gemma3-270m --out docs/bench_loss_prune_gemma3.json
    python benchmarks/bench_loss_prune.py --model default --out docs/bench_loss_prune_smollm2.json

Default settings are the issue's: ``--num-layers 4 --nsamples 8 --seqlen 128 --eval-tokens 4096``. Peak anonymous
memory = the largest ``RssAnon`` of the process tree sampled every 50 ms (benchmarks/bench_scale.py): memory-mapped
checkpoint pages are page cache, not memory the run holds.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_scale import run_measured  # noqa: E402

from gradmap.models import resolve_model_path  # noqa: E402
from gradmap.report import environment  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="gemma3-270m")
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--nsamples", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=128)
    p.add_argument("--eval-tokens", type=int, default=4096)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--paths", default="fused,full", help="which loss paths to run (fused, full)")
    p.add_argument("--work", default="/tmp/bench-loss-prune")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    path = resolve_model_path(args.model)
    model_bytes = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    results = {"model": args.model, "model_bytes": model_bytes, "settings": vars(args), "environment": environment()}
    for name in args.paths.split(","):
        env = dict(os.environ, PYTHONPATH=str(ROOT), GRADMAP_LOSS=name, OMP_NUM_THREADS=str(args.threads))
        out = Path(args.work) / name
        cmd = [sys.executable, "-m", "gradmap", "prune", "--model", args.model, "--num-layers", str(args.num_layers),
               "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--eval-tokens", str(args.eval_tokens),
               "--threads", str(args.threads), "--device", "cpu", "--dtype", "float32", "--output", str(out),
               "--overwrite", "-q"]
        measured = run_measured(cmd, env)
        report = json.loads((out / "gradmap_report.json").read_text())
        results[name] = dict(measured, removed=report["removal_order"], perplexity={k: v["ppl"] for k, v in
                                                                                    report["perplexity"].items()},
                             timings=report["timings"], anon_over_model=measured["peak_rss_anon_bytes"] / model_bytes)
        r = results[name]
        print(f"{name}: peak RssAnon {r['peak_rss_anon_bytes'] / 2**30:.2f} GiB ({r['anon_over_model']:.2f}x the "
              f"model), wall {r['wall_seconds']:.0f} s, timings {({k: round(v, 1) for k, v in r['timings'].items()})}, "
              f"removed {r['removed']}, PPL {r['perplexity']}", flush=True)
    if "fused" in results and "full" in results:
        f, g = results["fused"], results["full"]
        results["same_removed_layers"] = f["removed"] == g["removed"]
        results["ppl_relative_difference"] = {k: abs(f["perplexity"][k] - g["perplexity"][k]) / g["perplexity"][k]
                                              for k in g["perplexity"]}
        print(json.dumps({k: results[k] for k in ("same_removed_layers", "ppl_relative_difference")}))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
