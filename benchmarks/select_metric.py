"""Which stage-1 metric should be the default? Measure every variant against Block Influence on the real model.

Same model, same calibration windows, same test tokens, no compensation: prune the target number of layers with each
metric (iterative, one backward per decision) and with ShortGPT Block Influence (one-shot and iterative), then report
the test perplexity. Prints a markdown table and writes JSON (``--out``).

    python benchmarks/select_metric.py --num-layers 8 --nsamples 8 --seqlen 256 --out docs/metric_selection.json
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch

from gradmap.adapters import get_adapter
from gradmap.methods.shortgpt import block_influence
from gradmap.data import build_calibration, load_text, tokenize
from gradmap.evaluation import perplexity
from gradmap.models import load_model
from gradmap.pruning import select_iterative
from gradmap.removal import remove_layers
from gradmap.report import environment
from gradmap.scoring import METRICS


def _bi(model, cal, target, iterative):
    kept = list(range(len(get_adapter(model).layers(model))))
    removed, seconds = [], 0.0
    if not iterative:
        scores, seconds = block_influence(model, cal)
        removed = sorted(range(len(kept)), key=lambda i: float(scores[i]))[:target]
        remove_layers(model, removed)
        return removed, seconds
    while len(removed) < target:
        scores, s = block_influence(model, cal)
        seconds += s
        pos = int(torch.argmin(scores))
        removed.append(kept.pop(pos))
        remove_layers(model, [pos])
    return removed, seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--num-layers", type=int, default=8)
    ap.add_argument("--nsamples", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-seqlen", type=int, default=512)
    ap.add_argument("--eval-tokens", type=int, default=16 * 512)
    ap.add_argument("--metrics", default=",".join(METRICS) + ",bi_oneshot,bi_iterative")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    dense, tok = load_model(args.model)
    cal = build_calibration(tok, load_text("wiki", "calibration"), nsamples=args.nsamples, seqlen=args.seqlen,
                            seed=args.seed)
    test_ids = tokenize(tok, load_text("wiki", "test"))
    ppl = lambda m: perplexity(m, test_ids, seqlen=args.eval_seqlen, max_tokens=args.eval_tokens).ppl  # noqa: E731
    rows = [{"method": "dense", "removed": [], "seconds": 0.0, "ppl": ppl(dense)}]
    print(f"dense PPL {rows[0]['ppl']:.2f}", flush=True)
    for name in args.metrics.split(","):
        model = copy.deepcopy(dense)
        t0 = time.perf_counter()
        if name.startswith("bi_"):
            removed, _ = _bi(model, cal, args.num_layers, iterative=name == "bi_iterative")
        else:
            removed = select_iterative(model, cal, args.num_layers, metric=name, micro_batch=args.nsamples).removed
        seconds = time.perf_counter() - t0
        rows.append({"method": name, "removed": removed, "seconds": seconds, "ppl": ppl(model)})
        print(f"{name}: removed {removed} in {seconds:.1f} s, PPL {rows[-1]['ppl']:.2f}", flush=True)
    print("\n| method | removed layers (original indices, removal order) | selection time (s) | test PPL |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['removed']} | {r['seconds']:.1f} | {r['ppl']:.2f} |")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"settings": vars(args), "rows": rows, "environment": environment()}, fh, indent=2)


if __name__ == "__main__":
    main()
