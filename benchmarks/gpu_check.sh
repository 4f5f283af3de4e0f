#!/usr/bin/env bash
# Device check of the fused gradient-reduction kernel (gradmap.kernels, issue 3), as one prepared script:
#   1. the kernel tests of tests/test_grad_reduce.py on CUDA (compiled Triton, not the interpreter),
#   2. benchmarks/bench_grad_reduce_gpu.py: correctness vs fp64, no dW-sized allocation, time vs torch's matmul.
# Needs an NVIDIA GPU, a CUDA build of torch and the matching triton. Extra arguments go to the benchmark, e.g.
#   bash benchmarks/gpu_check.sh --tokens 4096 --shapes 4096x4096      (quick)
# Results: $OUT/bench_grad_reduce_gpu.json when $OUT is set (device runs), else ./bench_grad_reduce_gpu.json.
set -euo pipefail
cd "$(dirname "$0")/.."
export TRITON_INTERPRET=0
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
OUT_DIR=${OUT:-.}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "gpu_check: nvidia-smi not found"
$PY - <<'PYEOF'
import sys
import torch
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), cuda available: {torch.cuda.is_available()}")
if not torch.cuda.is_available():
    sys.exit("gpu_check: torch sees no CUDA device; install a CUDA build of torch (e.g. torch==2.14.1) and triton")
try:
    import triton
except ImportError:
    sys.exit("gpu_check: triton is not installed")
print(f"triton {triton.__version__}, device {torch.cuda.get_device_name()}")
PYEOF

status=0
if $PY -c "import pytest" 2>/dev/null; then
  $PY -m pytest -q -p no:cacheprovider tests/test_grad_reduce.py || status=$?
else
  echo "gpu_check: pytest not installed; skipping tests/test_grad_reduce.py (the benchmark still checks correctness)"
fi
$PY benchmarks/bench_grad_reduce_gpu.py --out "$OUT_DIR/bench_grad_reduce_gpu.json" "$@" || status=$?
exit $status
