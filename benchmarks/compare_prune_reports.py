"""Compare two ``gradmap prune`` reports (e.g. the same prune on ``cuda`` and on ``cpu``): exit 1 on a mismatch.

The runs agree when they removed the same decoder layers (original indices), evaluated on the same number of tokens,
and every perplexity both reports hold (dense, pruned, compensated) differs by at most ``--ppl-rtol`` (default 1 %)
relative to the second report.
With ``--layers-may-differ`` a different removal set is reported but not a failure (e.g. bf16 vs fp32, where near-tied
layer scores may legitimately swap). Writes the comparison as JSON with ``--out``.

    python benchmarks/compare_prune_reports.py RUN_A/gradmap_report.json RUN_B/gradmap_report.json [--ppl-rtol 0.01]
"""

from __future__ import annotations

import argparse
import json
import math
import sys


def _ppl(report: dict) -> dict[str, float]:
    """The perplexity of each evaluated model in a report: ``{"dense": 18.2, "pruned": ..., "compensated": ...}``
    (a report stores ``{"ppl", "nll", "tokens", "seconds", ...}`` per model; only ``ppl`` is compared)."""
    out: dict[str, float] = {}
    for name, value in (report.get("perplexity") or {}).items():
        if isinstance(value, dict) and isinstance(value.get("ppl"), (int, float)):
            out[name] = float(value["ppl"])
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = float(value)
    return out


def _eval_tokens(report: dict) -> dict[str, int | None]:
    return {name: value.get("tokens") for name, value in (report.get("perplexity") or {}).items()
            if isinstance(value, dict)}


def compare(a: dict, b: dict, ppl_rtol: float, layers_may_differ: bool) -> dict:
    """The comparison of report ``a`` against report ``b`` (the reference): ``{"ok": bool, "problems": [...], ...}``."""
    problems = []
    layers_a, layers_b = a.get("removed_layers"), b.get("removed_layers")
    same_layers = layers_a == layers_b
    if layers_a is None or layers_b is None:
        problems.append("a report has no removed_layers")
    elif not same_layers and not layers_may_differ:
        problems.append(f"removed layers differ: {layers_a} vs {layers_b}")
    ppl_a, ppl_b = _ppl(a), _ppl(b)
    shared = sorted(set(ppl_a) & set(ppl_b))
    rel = {}
    for key in shared:
        x, y = ppl_a[key], ppl_b[key]
        if not (math.isfinite(x) and math.isfinite(y)):
            problems.append(f"perplexity {key} is not finite: {x} vs {y}")
            continue
        rel[key] = abs(x - y) / abs(y)
        if rel[key] > ppl_rtol:
            problems.append(f"perplexity {key}: {x:.4f} vs {y:.4f} ({100 * rel[key]:.2f} % > {100 * ppl_rtol:.2f} %)")
    if not shared:
        problems.append("no perplexity in both reports")
    tokens_a, tokens_b = _eval_tokens(a), _eval_tokens(b)
    for key in sorted(set(tokens_a) & set(tokens_b)):
        if tokens_a[key] != tokens_b[key]:
            problems.append(f"perplexity {key} was measured on {tokens_a[key]} vs {tokens_b[key]} tokens")
    return {"ok": not problems, "problems": problems, "removed_layers": [layers_a, layers_b],
            "same_removed_layers": same_layers, "perplexity": {k: [ppl_a[k], ppl_b[k]] for k in shared},
            "perplexity_relative_difference": rel}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("report_a")
    ap.add_argument("report_b", help="the reference run")
    ap.add_argument("--ppl-rtol", type=float, default=0.01)
    ap.add_argument("--layers-may-differ", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    with open(args.report_a) as fa, open(args.report_b) as fb:
        result = compare(json.load(fa), json.load(fb), args.ppl_rtol, args.layers_may_differ)
    result["reports"] = [args.report_a, args.report_b]
    print(f"removed layers: {result['removed_layers'][0]} vs {result['removed_layers'][1]}")
    for key, (x, y) in result["perplexity"].items():
        print(f"perplexity {key}: {x:.4f} vs {y:.4f} ({100 * result['perplexity_relative_difference'].get(key, 0):.3f} %)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    if not result["ok"]:
        print("MISMATCH: " + "; ".join(result["problems"]), file=sys.stderr)
        return 1
    print("reports agree")
    return 0


if __name__ == "__main__":
    sys.exit(main())
