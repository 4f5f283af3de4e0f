#!/usr/bin/env bash
# Check that gradmap installs with plain pip in fresh virtual environments (README, "Install"):
#   1. torch installed first (the CPU wheel torch==2.13.0), then a plain `pip install .`: the installed torch is
#      kept (no second torch, no nvidia-* packages), gradmap imports, and the native ops are compiled on first use;
#   2. the same venv, `pip install --no-build-isolation .`: the library is built at install time and loaded as is;
#   3. a venv without torch, `pip install --dry-run .`: shows which torch pip would pick as a plain dependency.
#
#   bash scripts/check_pip_install.sh [WORK_DIR]      (default ${TMPDIR:-/tmp}/gradmap-pip-check; recreated)
#
# CPU_TORCH (default torch==2.13.0) is the torch of step 1. Exits non-zero on the first failed check.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=${1:-${TMPDIR:-/tmp}/gradmap-pip-check}
CPU_TORCH=${CPU_TORCH:-torch==2.13.0}
PY=${PYTHON:-python3}
case "$WORK/" in "$ROOT"/*) echo "check_pip_install: $WORK is inside the repository" >&2; exit 2 ;; esac
rm -rf "$WORK"
mkdir -p "$WORK"
cd "$WORK"  # never import the checkout's gradmap by accident
export GRADMAP_CACHE="$WORK/cache"

step() { echo; echo "== $*"; }
pip_in() { local venv=$1; shift; "$venv/bin/python" -m pip --disable-pip-version-check "$@"; }
no_errors() {  # pip's log must hold no ERROR line (e.g. resolver conflicts)
  if grep -n "^ERROR" "$1"; then echo "check_pip_install: pip printed errors (above)" >&2; exit 1; fi
}

step "1. venv with $CPU_TORCH, then a plain 'pip install $ROOT'"
A="$WORK/venv-torch-first"
"$PY" -m venv "$A"
pip_in "$A" install -q "$CPU_TORCH"
before=$("$A/bin/python" -c "import torch; print(torch.__version__)" 2>/dev/null)  # (numpy not installed yet)
t0=$(date +%s)
pip_in "$A" install "$ROOT" 2>&1 | tee "$WORK/pip-plain.log" | grep -E "^(Successfully|Requirement already satisfied: torch|gradmap:)" || true
no_errors "$WORK/pip-plain.log"
echo "pip install: $(( $(date +%s) - t0 )) s"
after=$("$A/bin/python" -c "import torch; print(torch.__version__)")
[[ "$before" == "$after" ]] || { echo "torch was replaced: $before -> $after" >&2; exit 1; }
if pip_in "$A" list 2>/dev/null | grep -i "^nvidia-"; then echo "nvidia-* packages were pulled in" >&2; exit 1; fi
echo "torch kept: $after; no nvidia-* packages"
t0=$(date +%s)
"$A/bin/python" - <<'PYEOF'
import warnings
warnings.simplefilter("error", RuntimeWarning)  # the reference fallback would be an error here
import gradmap
from gradmap import ops
info = ops.library_info()
assert "site-packages" in gradmap.__file__, gradmap.__file__
assert ops.backend("cpu") == "cpp" and info["source"] == "jit", info
print(f"import gradmap: backend('cpu') = {ops.backend('cpu')!r}, library compiled on first use: {info['path']}")
PYEOF
echo "first use (import + JIT build): $(( $(date +%s) - t0 )) s"
t0=$(date +%s)
"$A/bin/python" -c "import gradmap; print(gradmap.ops.backend('cpu'))"
echo "second use (cached library): $(( $(date +%s) - t0 )) s"

step "2. the same venv: 'pip install --no-build-isolation $ROOT' (library built at install time)"
pip_in "$A" install -q setuptools wheel ninja
rm -rf "$ROOT/build"
t0=$(date +%s)
pip_in "$A" install --no-build-isolation --no-deps --force-reinstall "$ROOT" 2>&1 | tee "$WORK/pip-nbi.log" | grep -E "^(Successfully|gradmap:)" || true
no_errors "$WORK/pip-nbi.log"
rm -rf "$ROOT/build"
echo "pip install --no-build-isolation: $(( $(date +%s) - t0 )) s"
"$A/bin/python" - <<'PYEOF'
from gradmap import ops
info = ops.library_info()
assert ops.backend("cpu") == "cpp" and info["source"] == "prebuilt" and "site-packages" in info["path"], info
print(f"backend('cpu') = 'cpp' from the library built at install time: {info['path']}")
PYEOF

step "3. venv without torch: what 'pip install $ROOT' would resolve (dry run)"
B="$WORK/venv-no-torch"
"$PY" -m venv "$B"
pip_in "$B" install -q --dry-run --ignore-installed --report "$WORK/report.json" "$ROOT" > "$WORK/pip-dry.log" 2>&1 \
  || { tail -20 "$WORK/pip-dry.log"; exit 1; }
"$B/bin/python" - "$WORK/report.json" <<'PYEOF'
import json, sys
items = json.load(open(sys.argv[1]))["install"]
names = {i["metadata"]["name"].lower(): i["metadata"]["version"] for i in items}
nvidia = sorted(n for n in names if n.startswith("nvidia-") or n.startswith("cuda-"))
print(f"torch as a dependency resolves to torch {names.get('torch')} with {len(nvidia)} CUDA packages "
      f"({', '.join(nvidia[:4])}{', ...' if len(nvidia) > 4 else ''}); {len(names)} packages in all")
PYEOF
echo
echo "check_pip_install: all checks passed"
