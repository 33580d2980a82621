#!/usr/bin/env bash
# GPU check: the GPU test tier and the benchmarks, on a CUDA machine, in one go.
#
#   bash bench/gpu_check.sh OUTDIR [--cpu] [--shim] [--budget SECONDS]
#
# Writes into OUTDIR:
#   env.txt          nvidia-smi, python/torch/triton/peft/bitsandbytes versions
#   import.txt       how fastlora.kernels was made importable
#   pytest-gpu.log   junit-gpu.xml   pytest -m gpu tests        (compiled kernels)
#   lora_cuda.csv    lora_cuda.md    python bench/report.py --device cuda
#   qlora_cuda.csv   qlora_cuda.md   python bench/report_qlora.py --device cuda
#   dora_cuda.csv    dora_cuda.md    python bench/report_dora.py --device cuda
#   strategies_cuda.csv strategies_cuda.md  python bench/cost_model.py --measure: every strategy, the model beside
#   strategy_cache.json  the strategies chosen by measurement on this GPU (FASTLORA_STRATEGY_CACHE)
#   pytest-all.log   junit-all.xml   pytest -m "not gpu" tests  (the rest, as on CPU)
#   summary.txt      one line per step: exit code and seconds
#
# Every step runs under `timeout` against one overall budget (default 450 s,
# env GPU_CHECK_BUDGET or --budget), so the script always finishes and keeps
# what it has. It installs nothing from the network. The machine it is made
# for has no network and no bitsandbytes (tests that need it skip).
#
# fastlora.kernels is the repository's top-level kernels/ folder, mapped by
# setuptools' package-dir, so a plain PYTHONPATH checkout cannot import it. In
# order, the script uses: an existing install that points at this checkout;
# `pip install --no-index --no-deps --no-build-isolation -e .`; a shim folder
# put first on PYTHONPATH whose sitecustomize.py maps fastlora.kernels to
# kernels/ (an import hook, as setuptools' editable install does).
#
# --cpu   test this script's logic on a CPU machine: report.py,
#         report_qlora.py and report_dora.py --device cpu --quick, a short test selection
#         (GPU_CHECK_TESTS, default tests/test_memory.py), no nvidia-smi needed.
# --shim  skip the first two ways and use the shim (tests the fallback).
# Python: $PYTHON, else `python`, else `python3`.

set -u

usage() { sed -n '2,35p' "$0"; exit 2; }
[ $# -ge 1 ] || usage
OUT=$1; shift
MODE=cuda
FORCE_SHIM=0
BUDGET=${GPU_CHECK_BUDGET:-450}
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu) MODE=cpu ;;
    --shim) FORCE_SHIM=1 ;;
    --budget) BUDGET=$2; shift ;;
    -h|--help) usage ;;
    *) echo "gpu_check.sh: unknown option $1" >&2; usage ;;
  esac
  shift
done

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
mkdir -p "$OUT" || exit 2
OUT=$(cd "$OUT" && pwd)
cd "$REPO" || exit 2
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif command -v python >/dev/null 2>&1; then PY=python
else PY=python3; fi

START=$(date +%s)
DEADLINE=$((START + BUDGET))
SUMMARY=$OUT/summary.txt
: > "$SUMMARY"
log() { echo "[gpu_check $(($(date +%s) - START))s] $*" | tee -a "$SUMMARY"; }

# run_step NAME MAX_SECONDS LOGFILE CMD...: runs CMD under timeout (SIGINT first,
# so pytest still writes its junit file and summary; KILL 15 s later), with at
# most MAX_SECONDS and never past the overall deadline (minus a 20 s reserve).
run_step() {
  local name=$1 max=$2 logfile=$3; shift 3
  local left=$((DEADLINE - $(date +%s) - 20))
  local t=$(( max < left ? max : left ))
  if [ "$t" -lt 15 ]; then
    log "$name: SKIPPED (out of time budget, ${left}s left)"
    return 0
  fi
  local t0=$(date +%s) rc
  timeout -s INT -k 15 "$t" "$@" > "$logfile" 2>&1
  rc=$?
  local status="rc=$rc"
  case $rc in
    124|137) status="$status (TIMED OUT at ${t}s)" ;;
  esac
  log "$name: $status in $(($(date +%s) - t0))s (limit ${t}s) -> $(basename "$logfile")"
  return 0
}

# ------------------------------------------------------------------ environment
{
  echo "date_utc: $(date -u '+%Y-%m-%d %H:%M:%S')"
  echo "mode: $MODE   budget: ${BUDGET}s   repo: $REPO   python: $(command -v "$PY")"
  echo "commit: $(git -C "$REPO" rev-parse HEAD 2>/dev/null || echo unknown)"
  echo "--- nvidia-smi"
  timeout 30 nvidia-smi 2>&1 || echo "(nvidia-smi unavailable)"
  echo "--- python packages"
  timeout 60 "$PY" - <<'EOF' 2>&1
import importlib, platform
print("python", platform.python_version())
for name in ("torch", "triton", "peft", "bitsandbytes", "numpy", "pytest", "pytest_benchmark", "transformers"):
    try:
        mod = importlib.import_module(name)
        print(f"{name} {getattr(mod, '__version__', '?')}")
    except Exception as exc:  # absent or broken: say which
        print(f"{name} unavailable ({type(exc).__name__}: {str(exc)[:100]})")
try:
    import torch
    print("cuda available:", torch.cuda.is_available(), "| torch.version.cuda:", torch.version.cuda)
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        print(f"device 0: {p.name}, {p.total_memory / 2**30:.1f} GiB, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs")
except Exception as exc:
    print("torch.cuda query failed:", exc)
EOF
} > "$OUT/env.txt" 2>&1
log "env: written env.txt"

# ------------------------------------------------------ make fastlora.kernels importable
CHECK_IMPORT='
import os, sys
import fastlora, fastlora.kernels
repo = os.path.realpath(sys.argv[1])
fl = os.path.realpath(os.path.dirname(fastlora.__file__))
kd = os.path.realpath(os.path.dirname(fastlora.kernels.__file__))
print("fastlora from", os.path.dirname(fastlora.__file__), "->", fl)
print("fastlora.kernels from", os.path.dirname(fastlora.kernels.__file__), "->", kd)
ok = fl == os.path.join(repo, "fastlora") and kd == os.path.join(repo, "kernels")
if len(sys.argv) > 2:  # shim: also check that the hook (not some install) was used
    ok = ok and getattr(sys, "_fastlora_kernels_shim", False)
print("points at this checkout:", ok)
sys.exit(0 if ok else 1)
'
IMPORT_LOG=$OUT/import.txt
: > "$IMPORT_LOG"
PP_EXTRA=""
import_ok() { PYTHONPATH="${PP_EXTRA:+$PP_EXTRA:}$REPO${PYTHONPATH:+:$PYTHONPATH}" TRITON_INTERPRET=0 \
  timeout 120 "$PY" -c "$CHECK_IMPORT" "$REPO" "$@" >> "$IMPORT_LOG" 2>&1; }
HOW=none
if [ $FORCE_SHIM = 0 ]; then
  echo "== 1. as installed / PYTHONPATH=$REPO" >> "$IMPORT_LOG"
  if import_ok; then HOW=existing; fi
  if [ $HOW = none ] && [ "$((DEADLINE - $(date +%s)))" -gt 200 ]; then
    echo "== 2. pip install --no-index --no-deps --no-build-isolation -e ." >> "$IMPORT_LOG"
    timeout 90 "$PY" -m pip install --no-index --no-deps --no-build-isolation -e . >> "$IMPORT_LOG" 2>&1
    echo "(pip rc=$?)" >> "$IMPORT_LOG"
    if import_ok; then HOW=pip-editable; fi
  fi
fi
if [ $HOW = none ]; then
  # NOTE: a shim *package* (a fastlora/ of symlinks) loses to the checkout's own
  # fastlora/ whenever the working directory comes first on sys.path
  # (`python -m pytest`, `python -c`), so the shim is an import hook instead: a
  # sitecustomize.py (imported at startup from PYTHONPATH) that maps exactly
  # `fastlora.kernels` to the checkout's kernels/ folder, as setuptools'
  # editable finder does; its submodules resolve through its __path__.
  SHIM=$(mktemp -d "${TMPDIR:-/tmp}/fastlora-shim.XXXXXX")
  cat > "$SHIM/sitecustomize.py" <<EOF
# Written by bench/gpu_check.sh: makes fastlora.kernels = $REPO/kernels importable.
import importlib.abc, importlib.util, os, sys

_KERNELS = "$REPO/kernels"


class _FastloraKernelsFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "fastlora.kernels":
            return None
        sys._fastlora_kernels_shim = True
        return importlib.util.spec_from_file_location(
            name, os.path.join(_KERNELS, "__init__.py"), submodule_search_locations=[_KERNELS])


sys.meta_path.insert(0, _FastloraKernelsFinder())
EOF
  echo "== 3. import hook $SHIM/sitecustomize.py (fastlora.kernels -> $REPO/kernels)" >> "$IMPORT_LOG"
  PP_EXTRA=$SHIM
  if import_ok --shim; then HOW=shim; else PP_EXTRA=""; fi
fi
export PYTHONPATH="${PP_EXTRA:+$PP_EXTRA:}$REPO${PYTHONPATH:+:$PYTHONPATH}"
log "import: fastlora.kernels via $HOW (details in import.txt)"

# ------------------------------------------------------------------ GPU tests
# NOTE: tests/conftest.py sets TRITON_INTERPRET=1 only when it is unset; the GPU
# tier must run compiled kernels, so it gets TRITON_INTERPRET=0 explicitly.
PYTEST=("$PY" -m pytest -p no:cacheprovider -q -rs --durations=15)
run_step "pytest -m gpu" 120 "$OUT/pytest-gpu.log" \
  env TRITON_INTERPRET=0 "${PYTEST[@]}" -m gpu tests --junitxml="$OUT/junit-gpu.xml"

# ------------------------------------------------------------------ benchmarks
if [ $MODE = cuda ]; then
  run_step "bench/report.py --device cuda" 150 "$OUT/report.log" \
    env TRITON_INTERPRET=0 "$PY" bench/report.py --device cuda --out "$OUT"
  run_step "bench/report_qlora.py --device cuda" 120 "$OUT/report_qlora.log" \
    env TRITON_INTERPRET=0 "$PY" bench/report_qlora.py --device cuda --out "$OUT"
  run_step "bench/report_dora.py --device cuda" 60 "$OUT/report_dora.log" \
    env TRITON_INTERPRET=0 "$PY" bench/report_dora.py --device cuda --out "$OUT"
  run_step "bench/report_multi.py --device cuda" 90 "$OUT/report_multi.log" \
    env TRITON_INTERPRET=0 "$PY" bench/report_multi.py --device cuda --out "$OUT"
else
  run_step "bench/report.py --device cpu --quick" 120 "$OUT/report.log" \
    env TRITON_INTERPRET=0 "$PY" bench/report.py --device cpu --quick --no-launches --out "$OUT"
  run_step "bench/report_qlora.py --device cpu --quick" 90 "$OUT/report_qlora.log" \
    env TRITON_INTERPRET=0 "$PY" bench/report_qlora.py --device cpu --quick --out "$OUT"
  run_step "bench/report_dora.py --device cpu --quick" 60 "$OUT/report_dora.log" \
    env TRITON_INTERPRET=0 "$PY" bench/report_dora.py --device cpu --quick --out "$OUT"
fi

# ------------------------------------------------------------------ strategies
# Every strategy of fastlora.strategies() timed on this GPU (each forced in turn,
# interleaved round by round), the cost model's prediction for the matching GPU
# printed beside each measurement; then one measured choice per shape through
# the public API, which writes its cache file here.
if [ $MODE = cuda ]; then
  run_step "bench/cost_model.py --measure --device cuda" 150 "$OUT/strategies.log" \
    env TRITON_INTERPRET=0 FASTLORA_STRATEGY_CACHE="$OUT/strategy_cache.json" \
    "$PY" bench/cost_model.py --measure --device cuda --budget 120 --out "$OUT"
  run_step "strategy choice (measured)" 60 "$OUT/strategy_choice.log" \
    env TRITON_INTERPRET=0 FASTLORA_STRATEGY_CACHE="$OUT/strategy_cache.json" "$PY" -c '
import torch, fastlora
dev, bf = "cuda", torch.bfloat16
for m, k, n in ((8192, 4096, 4096), (1, 4096, 4096), (16, 4096, 4096)):
    x = torch.randn(m, k, device=dev, dtype=bf, requires_grad=m > 16)
    w = torch.randn(n, k, device=dev, dtype=bf) / k**0.5
    a = (torch.randn(16, k, device=dev, dtype=bf) / k**0.5).requires_grad_(m > 16)
    b = (torch.randn(n, 16, device=dev, dtype=bf) * 0.1).requires_grad_(m > 16)
    if m > 16:
        fastlora.lora_linear(x, w, a, b, 2.0, dropout=0.1).sum().backward()
    else:
        with torch.no_grad():
            fastlora.qlora_linear(x, fastlora.quant.quantize_4bit(w), a, b, 2.0)
torch.cuda.synchronize()
print(fastlora.strategy_report())
'
else
  run_step "bench/cost_model.py --measure --device cpu --quick" 90 "$OUT/strategies.log" \
    env TRITON_INTERPRET=0 "$PY" bench/cost_model.py --measure --device cpu --quick --out "$OUT"
fi

# ------------------------------------------------------------------ the other tiers
if [ $MODE = cuda ]; then TESTS=${GPU_CHECK_TESTS:-tests}; else TESTS=${GPU_CHECK_TESTS:-tests/test_memory.py}; fi
# shellcheck disable=SC2086  # TESTS may name several paths
run_step "pytest -m 'not gpu' $TESTS" 240 "$OUT/pytest-all.log" \
  "${PYTEST[@]}" -m "not gpu" $TESTS --junitxml="$OUT/junit-all.xml"

# ------------------------------------------------------------------ summary
for f in pytest-gpu.log pytest-all.log; do
  [ -f "$OUT/$f" ] && log "$f: $(grep -E '(passed|failed|error|skipped|no tests ran|deselected)' "$OUT/$f" | tail -1)"
done
log "done in $(($(date +%s) - START))s; files: $(cd "$OUT" && ls | tr '\n' ' ')"
[ -f "$OUT/lora_$MODE.md" ] && cat "$OUT/lora_$MODE.md"
[ -f "$OUT/qlora_$MODE.md" ] && cat "$OUT/qlora_$MODE.md"
[ -f "$OUT/dora_$MODE.md" ] && cat "$OUT/dora_$MODE.md"
[ -f "$OUT/multi_$MODE.md" ] && cat "$OUT/multi_$MODE.md"
[ -f "$OUT/strategies_$MODE.md" ] && cat "$OUT/strategies_$MODE.md"
[ -f "$OUT/strategy_choice.log" ] && cat "$OUT/strategy_choice.log"
exit 0
