#!/usr/bin/env bash
# Device check of the fused linear cross-entropy (gradmap.kernels.linear_cross_entropy, issue 15), one script:
#   1. tests/test_linear_cross_entropy.py on CUDA with compiled Triton (TRITON_INTERPRET=0; the CPU Triton cases skip),
#   2. benchmarks/bench_loss.py --device cuda: peak bytes and time vs full logits, loss/grad agreement per case.
# Needs an NVIDIA GPU, a CUDA build of torch and the matching triton. Extra arguments go to the benchmark
# (e.g. --dtype bfloat16). Results: $OUT/bench_loss_cuda.json when $OUT is set, else ./bench_loss_cuda.json.
set -euo pipefail
cd "$(dirname "$0")/.."
export TRITON_INTERPRET=0
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
OUT_DIR=${OUT:-.}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "gpu_check_loss: no nvidia-smi"
$PY -c "import torch, triton, sys; print(torch.__version__, torch.version.cuda, triton.__version__); \
sys.exit(0 if torch.cuda.is_available() else 'gpu_check_loss: torch sees no CUDA device')"
status=0
$PY -m pytest -q tests/test_linear_cross_entropy.py -x -p no:cacheprovider || status=$?
$PY benchmarks/bench_loss.py --device cuda --out "$OUT_DIR/bench_loss_cuda.json" "$@" || status=$?
exit $status
