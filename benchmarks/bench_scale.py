"""Layer streaming at scale, measured: a ~1B-parameter random-weight Llama checkpoint pruned resident and with
``--max-memory`` below its size, on the CPU, through the real command line in a subprocess.

    python benchmarks/bench_scale.py make --out /tmp/llama-1b          # write the checkpoint (4 GB, fp32, sharded)
    python benchmarks/bench_scale.py run --model /tmp/llama-1b --out docs/bench_scale.json

``make``: transformers' ``LlamaConfig`` (hidden 2048, FFN 5632, 18 layers, 16 heads / 4 KV heads, vocabulary 49,152 so
the bundled SmolLM2 tokenizer fits, untied head: 1.02B parameters), written shard by shard with gradmap's own
checkpoint writer (safetensors, 2 GB shards), every tensor drawn from a seeded generator (normal, std 0.02; norms 1).
Each layer's residual branches (``o_proj``, ``down_proj``) are scaled by its own factor, a seeded permutation of
0.3 … 3.0, so the layers differ clearly in importance and the rankings are not near-ties.

``run``: the same ``gradmap prune`` (2 layers, every-gap compensation, the bundled Wikipedia calibration text) twice:
resident (no cap) and streamed (``--max-memory`` = ``--cap`` × the checkpoint's bytes). For each: wall seconds,
removed layers, and the peak ANONYMOUS memory of the process tree (``RssAnon`` of ``/proc/<pid>/status`` summed over
the process and its children, sampled every 50 ms): memory-mapped checkpoint pages are page cache the kernel can drop,
not memory the run holds, so they do not count. Also ``gradmap plan``'s estimate for the same flags, compared with the
measured anonymous peak minus the interpreter's baseline (the working set the plan estimates beside the weights).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gradmap.checkpoint import TensorEntry, write_checkpoint  # noqa: E402
from gradmap.engine import build_skeleton  # noqa: E402
from gradmap.models import resolve_model_path  # noqa: E402
from gradmap.report import environment  # noqa: E402
from transformers import AutoTokenizer, LlamaConfig  # noqa: E402

GiB = 1 << 30


def make(out: Path, seed: int = 0) -> Path:
    """Write the random-weight ~1B Llama checkpoint (module docstring) with the SmolLM2 tokenizer."""
    config = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=18, num_attention_heads=16,
                         num_key_value_heads=4, vocab_size=49152, max_position_embeddings=2048,
                         tie_word_embeddings=False, rms_norm_eps=1e-5)
    skeleton = build_skeleton(config)
    gen = torch.Generator().manual_seed(seed)
    scales = torch.linspace(0.3, 3.0, config.num_hidden_layers)[torch.randperm(config.num_hidden_layers, generator=gen)]
    entries = []
    for i, (name, p) in enumerate(skeleton.named_parameters()):
        def load(name=name, shape=tuple(p.shape), i=i):
            if name.endswith("norm.weight"):
                return torch.ones(shape)
            t = torch.randn(shape, generator=torch.Generator().manual_seed(seed * 100_003 + i)) * 0.02
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                t *= float(scales[int(name.split(".")[2])])
            return t
        entries.append(TensorEntry(name, tuple(p.shape), torch.float32, load))
    config.architectures = ["LlamaForCausalLM"]
    path = write_checkpoint(entries, config, out, tokenizer=AutoTokenizer.from_pretrained(resolve_model_path("default")),
                            overwrite=True)
    (path / "residual_scales.json").write_text(json.dumps([float(s) for s in scales]))
    return path


def _anon_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        return 0
    return 0


def _tree(pid: int) -> list[int]:
    out = [pid]
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return out
    for c in children:
        out += _tree(int(c))
    return out


def run_measured(cmd: list[str], env: dict) -> dict:
    """Run ``cmd``; return wall seconds and the peak RssAnon (bytes) of its process tree."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = [0]

    def sample():
        while proc.poll() is None:
            peak[0] = max(peak[0], sum(_anon_kib(p) for p in _tree(proc.pid)))
            time.sleep(0.05)

    t0 = time.perf_counter()
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    output = proc.communicate()[0]
    thread.join()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{output[-4000:]}")
    return {"wall_seconds": wall, "peak_rss_anon_bytes": peak[0] * 1024, "output_tail": output[-1500:]}


def baseline_anon(env: dict) -> int:
    """RssAnon of a Python that imported gradmap, torch and transformers and did nothing (bytes)."""
    code = ("import gradmap.cli, time, sys; print(open('/proc/self/status').read().split('RssAnon:')[1].split()[0])")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1]) * 1024


def run(args) -> dict:
    model = Path(args.model)
    size = sum(f.stat().st_size for f in model.glob("*.safetensors"))
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=str(args.threads))
    common = [sys.executable, "-m", "gradmap", "prune", "--model", str(model), "--num-layers", str(args.num_layers),
              "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--no-eval", "--no-speed",
              "--holdout", "0", "--device", "cpu", "--dtype", "float32", "--threads", str(args.threads), "-q"]
    cap = int(args.cap * size)
    results = {"checkpoint_bytes": size, "cap_bytes": cap, "settings": vars(args), "environment": environment(),
               "baseline_rss_anon_bytes": baseline_anon(env)}
    for name, extra in (("resident", []), ("streamed", ["--max-memory", str(cap)])):
        out = Path(args.work) / name
        measured = run_measured(common + extra + ["--output", str(out), "--overwrite"], env)
        report = json.loads((out / "gradmap_report.json").read_text())
        plan_cmd = [sys.executable, "-m", "gradmap", "plan"] + common[4:] + extra + ["--json"]
        plan = json.loads(subprocess.run(plan_cmd, env=env, capture_output=True, text=True, check=True).stdout)
        working = plan["peak_device"] - plan["resident_weights"] - plan["streamed_slots"]
        measured_working = measured["peak_rss_anon_bytes"] - results["baseline_rss_anon_bytes"]
        results[name] = dict(measured, removed=report["removal_order"], memory=report["memory"],
                             selection_seconds=report["selection"]["seconds"],
                             compensation_seconds=report["compensation"]["seconds"],
                             anon_fraction_of_checkpoint=measured["peak_rss_anon_bytes"] / size,
                             plan_working_set_bytes=working, measured_working_set_bytes=measured_working,
                             plan_over_measured=working / measured_working if measured_working > 0 else None)
        print(f"{name}: {measured['wall_seconds']:.0f} s, peak RssAnon {measured['peak_rss_anon_bytes'] / GiB:.2f} GiB "
              f"({results[name]['anon_fraction_of_checkpoint']:.3f} of the checkpoint), removed {report['removal_order']}, "
              f"plan working set {working / GiB:.2f} GiB vs measured {measured_working / GiB:.2f} GiB", flush=True)
    results["same_removed_layers"] = results["resident"]["removed"] == results["streamed"]["removed"]
    results["streamed_over_resident_time"] = (results["streamed"]["wall_seconds"]
                                              / results["resident"]["wall_seconds"])
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("make", help="write the ~1B random-weight Llama checkpoint")
    m.add_argument("--out", required=True)
    m.add_argument("--seed", type=int, default=0)
    r = sub.add_parser("run", help="prune it resident and streamed; measure")
    r.add_argument("--model", required=True)
    r.add_argument("--work", default="/tmp/bench-scale", help="where the pruned outputs go")
    r.add_argument("--cap", type=float, default=0.3, help="--max-memory as a fraction of the checkpoint (default 0.3)")
    r.add_argument("--num-layers", type=int, default=2)
    r.add_argument("--nsamples", type=int, default=8)
    r.add_argument("--seqlen", type=int, default=128)
    r.add_argument("--threads", type=int, default=2)
    r.add_argument("--out", default=None, help="JSON results file")
    args = p.parse_args(argv)
    if args.command == "make":
        path = make(Path(args.out), args.seed)
        print(f"wrote {path} ({sum(f.stat().st_size for f in path.glob('*.safetensors')) / GiB:.2f} GiB)")
        return 0
    results = run(args)
    text = json.dumps(results, indent=1, default=str)
    if args.out:
        Path(args.out).write_text(text)
    print(json.dumps({k: results[k] for k in ("checkpoint_bytes", "cap_bytes", "same_removed_layers",
                                              "streamed_over_resident_time")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
