#!/usr/bin/env bash
# Build a gradmap wheel against the CUDA build of torch in a fresh virtual environment, install it there, and check
# that it imports and computes without a GPU (the CUDA kernels are registered; they run where a GPU is present).
#
#   bash scripts/build_cuda_wheel.sh [VENV_DIR]
#
# VENV_DIR (default ${TMPDIR:-/tmp}/gradmap-cuda-venv) is deleted and recreated; it must be outside the repository.
# The wheel lands in VENV_DIR/dist. TORCH_SPEC (default torch==2.14.1, a CUDA 13.0 build) picks the torch; PYTHON
# the interpreter that makes the venv. No CUDA toolkit is needed: the CUDA kernels are plain C++ calling ATen's cuBLAS
# GEMMs, compiled by the C++ compiler. The wheel only works with the torch it was built against (its C++ ABI); with
# another torch, gradmap passes it over and compiles the ops again on first use (gradmap/ops.py).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENV=${1:-${TMPDIR:-/tmp}/gradmap-cuda-venv}
TORCH_SPEC=${TORCH_SPEC:-torch==2.14.1}
PY=${PYTHON:-python3}
mkdir -p "$(dirname "$VENV")"
VENV=$(cd "$(dirname "$VENV")" && pwd)/$(basename "$VENV")
case "$VENV/" in
  "$ROOT"/*) echo "build_cuda_wheel: $VENV is inside the repository; give a directory outside it" >&2; exit 2 ;;
esac

step() { echo; echo "== $*"; }
now() { date +%s.%N; }
seconds() { python3 -c "print(f'{$2 - $1:.1f}')"; }

step "fresh venv $VENV"
rm -rf "$VENV"
"$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)

step "install $TORCH_SPEC and the build tools"
t0=$(now)
"${PIP[@]}" "$TORCH_SPEC"
"${PIP[@]}" setuptools wheel ninja numpy  # numpy: torch warns at import without it
t1=$(now)
"$VENV/bin/python" -c "import torch; print(f'torch {torch.__version__} (CUDA {torch.version.cuda}), GPU visible: {torch.cuda.is_available()}')"
"$VENV/bin/python" -c "import torch, sys; sys.exit(0 if torch.version.cuda else 'build_cuda_wheel: $TORCH_SPEC is not a CUDA build')"

step "build the wheel (no build isolation: compiled against this venv's torch)"
rm -rf "$ROOT/build"  # objects of a build against another torch must not be reused
t2=$(now)
GRADMAP_BUILD_EXT=1 "$VENV/bin/python" -m pip wheel -q --disable-pip-version-check --no-build-isolation --no-deps \
  -w "$VENV/dist" "$ROOT"
t3=$(now)
rm -rf "$ROOT/build"
WHEEL=$(ls "$VENV"/dist/gradmap-*.whl)
"$VENV/bin/python" - "$WHEEL" <<'PYEOF'
import json, sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
libs = [n for n in names if n.startswith("gradmap/_C") and n.endswith(".so")]
srcs = [n for n in names if n.startswith("gradmap/csrc/")]
assert libs, f"no compiled library in the wheel: {names}"
assert "gradmap/_C.build.json" in names and srcs, names
info = json.loads(zipfile.ZipFile(sys.argv[1]).read("gradmap/_C.build.json"))
print(f"wheel holds {libs[0]} (built for torch {info['torch']}, CUDA {info['cuda']}) and {len(srcs)} source files")
PYEOF

step "install the wheel (with its dependencies; the installed torch is kept)"
"${PIP[@]}" "$WHEEL"
"$VENV/bin/python" -c "import torch; print(f'torch after install: {torch.__version__}')"

step "import gradmap outside the repository, without a GPU"
cd "$VENV"
"$VENV/bin/python" - <<'PYEOF'
import warnings
import torch
with warnings.catch_warnings():
    warnings.simplefilter("error", RuntimeWarning)  # a fallback to the references would be an error here
    import gradmap
    from gradmap import ops
    from gradmap.projection import fold_projection_
info = ops.library_info()
assert "site-packages" in gradmap.__file__, gradmap.__file__
assert info["source"] == "prebuilt" and "site-packages" in info["path"], info
assert ops.backend("cpu") == "cpp" and ops.backend("cuda") == "cuda", (ops.backend("cpu"), ops.backend("cuda"))
W = torch.tensor([[1.0, 0.0, 2.0], [0.0, 1.0, -1.0]])
fold_projection_(W, torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64))
assert W.tolist() == [[1.0, 3.0, -1.0], [2.0, 4.0, 0.0]], W
print(f"gradmap {gradmap.__version__} from {gradmap.__file__}")
for device in ("cpu", "cuda"):
    print(f"backend({device!r}) = {ops.backend(device)!r}")
PYEOF
"$VENV/bin/gradmap" env

step "summary"
echo "torch + build tools install: $(seconds "$t0" "$t1") s"
echo "wheel build:                 $(seconds "$t2" "$t3") s"
echo "wheel: $WHEEL ($(stat -c %s "$WHEEL") bytes)"
echo "venv size: $(du -sh "$VENV" | cut -f1)"
