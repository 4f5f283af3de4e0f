"""Which stage-2 mode should be the default? Prune once, then compare compensation modes and ridge choices.

The layers are selected once (stage 1, ``--metric``); each stage-2 variant starts from a copy of the same pruned model
and the same calibration windows, and is scored by test perplexity. Prints a markdown table, writes JSON (``--out``).

    python benchmarks/select_compensation.py --out docs/compensation_selection.json
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch

from gradmap.api import DEFAULT_METRIC
from gradmap.compensation import compensate
from gradmap.data import build_calibration, load_text, tokenize
from gradmap.evaluation import perplexity
from gradmap.models import load_model
from gradmap.pruning import select_iterative
from gradmap.report import environment

VARIANTS = {
    "none": dict(mode="none"),
    "max-shift, ridge auto": dict(mode="max-shift"),
    "max-shift, ridge 1e-3": dict(mode="max-shift", ridge=1e-3),
    "every-gap, ridge auto": dict(mode="every-gap"),
    "every-gap, ridge 1e-3": dict(mode="every-gap", ridge=1e-3),
    "every-gap, ridge 0.1": dict(mode="every-gap", ridge=0.1),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--metric", default=DEFAULT_METRIC)
    ap.add_argument("--num-layers", type=int, default=8)
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-seqlen", type=int, default=512)
    ap.add_argument("--eval-tokens", type=int, default=16 * 512)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    dense, tok = load_model(args.model)
    cal = build_calibration(tok, load_text("wiki", "calibration"), nsamples=args.nsamples, seqlen=args.seqlen,
                            seed=args.seed)
    test_ids = tokenize(tok, load_text("wiki", "test"))
    ppl = lambda m: perplexity(m, test_ids, seqlen=args.eval_seqlen, max_tokens=args.eval_tokens).ppl  # noqa: E731
    pruned = copy.deepcopy(dense)
    sel = select_iterative(pruned, cal, args.num_layers, metric=args.metric)
    kept = [i for i in range(dense.config.num_hidden_layers) if i not in sel.removed]
    rows = [{"variant": "dense", "ppl": ppl(dense), "seconds": 0.0}]
    print(f"removed {sorted(sel.removed)} with {args.metric} in {sel.seconds:.1f} s", flush=True)
    for name, kw in VARIANTS.items():
        model = copy.deepcopy(pruned)
        t0 = time.perf_counter()
        res = compensate(dense, model, kept, cal, **kw)
        seconds = time.perf_counter() - t0
        rows.append({"variant": name, "ppl": ppl(model), "seconds": seconds,
                     "fits": [(f.layer, f.ridge, f.applied) for f in res.fits],
                     "max_shift_layer": max(res.shifts, key=res.shifts.get) if res.shifts else None})
        print(f"{name}: PPL {rows[-1]['ppl']:.2f} in {seconds:.1f} s, fits {rows[-1]['fits']}", flush=True)
    print(f"\nremoved layers {sorted(sel.removed)} ({args.metric}); calibration {args.nsamples}x{args.seqlen}")
    print("| stage 2 | test PPL | time (s) | folds (layer, ridge, applied) |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['ppl']:.2f} | {r['seconds']:.1f} | {r.get('fits', '')} |")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"settings": vars(args), "removed": sel.removed, "rows": rows, "environment": environment()},
                      fh, indent=2)


if __name__ == "__main__":
    main()
