"""``gradmap plan`` for Llama-3-8B and Llama-3-70B on one and eight 80 GB GPUs, from their public shapes (configs are
written here; no weights, no download), into ``docs/plan_llama3.txt``.

    python benchmarks/plan_llama3.py --out docs/plan_llama3.txt

Settings: 128 calibration windows × 2048 tokens, bfloat16, stage 2 on (4 folds), ``--max-memory cuda=80GiB,cpu=1800GiB``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMON = dict(architectures=["LlamaForCausalLM"], model_type="llama", num_key_value_heads=8, vocab_size=128256,
              max_position_embeddings=8192, tie_word_embeddings=False, rms_norm_eps=1e-5, hidden_act="silu",
              torch_dtype="bfloat16")
SHAPES = {"8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32),
          "70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None, help="text file (default: print)")
    args = p.parse_args(argv)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    parts = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, shape in SHAPES.items():
            model = Path(tmp) / f"llama3-{name}"
            model.mkdir()
            (model / "config.json").write_text(json.dumps({**COMMON, **shape}))
            for world in (1, 8):
                cmd = [sys.executable, "-m", "gradmap", "plan", "--model", str(model), "--ratio", "0.25",
                       "--nsamples", "128", "--seqlen", "2048", "--device", "cuda", "--dtype", "bfloat16",
                       "--max-memory", "cuda=80GiB,cpu=1800GiB", "--world-size", str(world)]
                out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
                parts.append(f"== Llama-3-{name.upper()} world {world}\n{out}")
    text = "".join(parts)
    if args.out:
        Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
