"""Which stage-2 variant should be the default? Select the layers once, then compare the stage-2 variants on the same
pruned model and the same calibration windows, scored by test perplexity.

    python benchmarks/select_compensation.py --out docs/compensation_selection.json
    python benchmarks/select_compensation.py --model gemma3-270m --out docs/compensation_selection_gemma.json

The layers are removed by GradMAP's default selection (stage 1, ``--metric``; the iterative schedule) on the dense
model's engine; every variant then starts from that same view (no fold applied), runs
:func:`gradmap.compensation.compensate` and is evaluated by :func:`gradmap.evaluation.view_perplexity` on the first
``--eval-tokens`` tokens of the Wikipedia test split. Variants: no stage 2; the closed-form ridge fit at every gap
(cross-validated λ on an adaptive grid); the same with the Adam-trained fit; the closed form at the max-shift layer;
the paper's stage 2 as described (``trained``: the max-shift layer, an Adam-trained projection). Prints a markdown
table and writes JSON (settings, removed layers, per-variant PPL, stage-2 seconds, the fits, versions).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gradmap.compensation import compensate  # noqa: E402
from gradmap.data import build_calibration, load_text, tokenize  # noqa: E402
from gradmap.engine import Engine, Windows  # noqa: E402
from gradmap.evaluation import perplexity_windows, view_perplexity  # noqa: E402
from gradmap.methods import select_layers  # noqa: E402
from gradmap.models import load_model  # noqa: E402
from gradmap.names import DEFAULT_METRIC  # noqa: E402
from gradmap.report import environment  # noqa: E402

VARIANTS = {  # key: (label, compensate() arguments)
    "none": ("no stage 2", dict(mode="none")),
    "every-gap": ("every-gap, ridge (cross-validated λ)", dict(mode="every-gap")),
    "every-gap-trained": ("every-gap, Adam-trained", dict(mode="every-gap", fit="trained")),
    "max-shift": ("max-shift, ridge (cross-validated λ)", dict(mode="max-shift")),
    "trained": ("trained (the paper's: max-shift layer, Adam)", dict(mode="trained")),
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="default", help="bundled model name or HF directory (default: SmolLM2-135M)")
    ap.add_argument("--metric", default=DEFAULT_METRIC)
    ap.add_argument("--ratio", type=float, default=0.25, help="fraction of decoder layers removed (default 0.25)")
    ap.add_argument("--nsamples", type=int, default=32, help="calibration windows (default 32)")
    ap.add_argument("--seqlen", type=int, default=256, help="tokens per calibration window (default 256)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--folds", type=int, default=4, help="cross-validation groups of stage 2 (default 4)")
    ap.add_argument("--eval-seqlen", type=int, default=1024)
    ap.add_argument("--eval-tokens", type=int, default=32 * 1024, help="test tokens scored (default 32768)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of the variants")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None, help="JSON results file")
    args = ap.parse_args(argv)
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        ap.error(f"--variants: unknown {unknown}; accepted: {', '.join(VARIANTS)}")
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    model, tok = load_model(args.model)
    cal = build_calibration(tok, load_text("wiki", "calibration"), nsamples=args.nsamples, seqlen=args.seqlen,
                            seed=args.seed)
    test_ids = tokenize(tok, load_text("wiki", "test"))
    windows = perplexity_windows(test_ids, seqlen=args.eval_seqlen, max_tokens=args.eval_tokens,
                                 max_length=getattr(model.config, "max_position_embeddings", None))
    n_layers = model.config.get_text_config().num_hidden_layers
    target = round(args.ratio * n_layers)
    calib = Windows.from_calibration(cal, args.micro_batch, groups=args.folds)

    def ppl(engine) -> float:
        return view_perplexity(engine, windows, seqlen=args.eval_seqlen, stride=args.eval_seqlen).ppl

    with Engine.for_module(model) as engine:
        dense_ppl = ppl(engine)
        traj = engine.trajectory(calib)
        t0 = time.perf_counter()
        sel = select_layers(traj, target, method="gradmap", metric=args.metric)
        selection_seconds = time.perf_counter() - t0
        removed = sorted(sel.removed)
    print(f"dense PPL {dense_ppl:.3f}; removed {removed} ({args.metric}) in {selection_seconds:.1f} s", flush=True)
    rows = [{"variant": "dense", "ppl": dense_ppl, "seconds": 0.0}]
    for name in names:
        label, kw = VARIANTS[name]
        with Engine.for_module(model) as engine:
            traj = engine.trajectory(calib)
            traj.forward()
            dense = traj.snapshot()
            for layer in removed:
                engine.remove(layer)
            t0 = time.perf_counter()
            res = compensate(traj, dense, **kw)
            seconds = time.perf_counter() - t0
            engine.release(dense)
            engine.release(traj)
            row = {"variant": name, "label": label, "ppl": ppl(engine), "seconds": seconds,
                   "fits": [{"layer": f.layer, "ridge": f.ridge, "steps": getattr(f, "steps", None),
                             "applied": f.applied, "cv_loss_before": f.loss_before, "cv_loss_after": f.loss_after}
                            for f in res.fits],
                   "notes": res.notes}
        rows.append(row)
        fits = ", ".join(f"{f['layer']}:{'steps ' + str(f['steps']) if f['steps'] else f['ridge']}"
                         f"{'' if f['applied'] else ' (skipped)'}" for f in row["fits"])
        print(f"{name}: PPL {row['ppl']:.3f}, stage 2 {seconds:.1f} s, fits [{fits}]", flush=True)
    print(f"\nremoved {removed} ({args.metric}, {selection_seconds:.1f} s); calibration {args.nsamples}x{args.seqlen}; "
          f"test tokens {args.eval_tokens}")
    print("| stage 2 | test PPL | stage-2 s | folds (layer: ridge or Adam steps) |\n|---|---|---|---|")
    for r in rows:
        fits = ", ".join(f"{f['layer']}: {'steps ' + str(f['steps']) if f['steps'] else f['ridge']}"
                         f"{'' if f['applied'] else ' skipped'}" for f in r.get("fits", []))
        print(f"| {r.get('label', r['variant'])} | {r['ppl']:.2f} | {r['seconds']:.1f} | {fits} |")
    if args.out:
        Path(args.out).write_text(json.dumps({"settings": vars(args), "removed": removed,
                                              "selection_seconds": selection_seconds, "rows": rows,
                                              "environment": environment()}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
