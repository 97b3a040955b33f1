#!/usr/bin/env bash
# The GPU check, made for a lent machine with one NVIDIA GPU, no network, a few minutes:
#
#   OUT=<dir> tools/gpu_verify.sh [all | STAGE ...]
#
# Stages, run in this order (`all` = every one, most important first):
#   build     the extension in place (ninja; the visible GPU's arch) and `python -m kxops`
#   smoke     tests/test_cuda_smoke.py: every op and optimizer path once against the reference
#   test      every test marked cuda
#   sanitize  compute-sanitizer: memcheck over the smoke test, racecheck and synccheck over the
#             smoke tests of the kernels with shared memory and barriers (ZLPR, AdaX)
#   bench     benchmarks/run.py on CUDA: first the trained-like linear head (exact, with
#             grad_filter through the CUDA sparse products, and its peers), then one op at a
#             time (zlpr, adax, gated_conv, then the two fused heads)
#   profile   tools/profile_cuda.py (torch.profiler table of each op's kernels) and Nsight
#             Compute's speed-of-light and memory sections of kxops's own kernels
#
# A deadline (BUDGET_S seconds from the start, default 450) keeps the whole run inside one
# device call: each stage runs under `timeout` with what is left, a stage that no longer fits
# is skipped, and the summary says which. $OUT receives two files: summary.md (one page: each
# stage's verdict, time and last lines) and results.tar.gz (every log, kxops info, the
# benchmark CSV/MD/PNGs to copy into benchmarks/results/).
#
# Without a CUDA device (e.g. CI) the CUDA stages are skipped and the rest runs: a dry run that
# keeps this script from rotting. pytest-benchmark comes from build/gpu-wheels when it is not
# installed (`make gpu-wheels` here; the device run carries that ignored folder).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_out}
BUDGET_S=${BUDGET_S:-450}
PY=${PYTHON:-python3}
WORK=$(mktemp -d)
LOGS=$WORK/gpu_verify
mkdir -p "$OUT" "$LOGS"
START=$SECONDS
status=0
summary=()

# Every file a stage runs, so that the dry run (CI) fails as soon as one moves.
SMOKE_TEST=tests/test_cuda_smoke.py
BENCH_OPS=(zlpr adax gated_conv linear_sparse_zlpr global_pointer_zlpr)
# The trained-like filtered linear head (the sparse gradient products), timed before the rest.
TRAINED_BENCH=test_linear_sparse_zlpr_trained
PROFILER=tools/profile_cuda.py
check_paths() {
  local path missing=0
  for path in "$SMOKE_TEST" "$PROFILER" benchmarks/run.py setup.py \
    "${BENCH_OPS[@]/#/benchmarks/bench_}"; do
    path=${path%.py}.py
    [ -f "$path" ] || { echo "gpu_verify.sh: $path does not exist" >&2; missing=1; }
  done
  grep -q "def $TRAINED_BENCH(" benchmarks/bench_linear_sparse_zlpr.py ||
    { echo "gpu_verify.sh: $TRAINED_BENCH is not in bench_linear_sparse_zlpr.py" >&2; missing=1; }
  return $missing
}
check_paths || exit 2

left() { echo $((BUDGET_S - (SECONDS - START))); }

# step NAME MIN_S MAX_S COMMAND...: run with a timeout of min(MAX_S, time left), logging to
# $LOGS/NAME.log; skipped if fewer than MIN_S seconds are left.
step() {
  local name=$1 min=$2 max=$3
  shift 3
  local budget
  budget=$(left)
  if [ "$budget" -lt "$min" ]; then
    summary+=("| $name | skipped: ${budget} s left, needs ${min} s | | |")
    echo "== $name: skipped (${budget} s left)"
    return 1
  fi
  [ "$budget" -lt "$max" ] && max=$budget
  local t0=$SECONDS
  timeout --kill-after=10 "$max" "$@" >"$LOGS/$name.log" 2>&1
  local rc=$?
  local verdict=ok
  [ $rc -eq 0 ] || { verdict="FAILED (rc $rc)"; status=1; }
  [ $rc -eq 124 ] && verdict="TIMED OUT after $max s"
  local tail_line
  tail_line=$(grep -v '^\s*$' "$LOGS/$name.log" | tail -n 1 | tr '|' '/' | cut -c1-160)
  summary+=("| $name | $verdict | $((SECONDS - t0)) s | \`$tail_line\` |")
  echo "== $name: $verdict ($((SECONDS - t0)) s)"
  tail -n 3 "$LOGS/$name.log"
  return $rc
}

has_gpu() { "$PY" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' 2>/dev/null; }

skip_no_gpu() {
  summary+=("| $1 | skipped: no CUDA device | | |")
  echo "== $1: skipped (no CUDA device)"
}

stage_build() {
  step build 60 300 "$PY" setup.py build_ext --inplace || return 1
  "$PY" -m kxops >"$LOGS/info.txt" 2>&1
  cat "$LOGS/info.txt"
}

stage_smoke() { step smoke 30 120 "$PY" -m pytest "$SMOKE_TEST" -q -rs; }

stage_test() {
  step test 60 180 "$PY" -m pytest tests -m cuda -q -rs --durations=15 -p no:cacheprovider
}

stage_sanitize() {
  step memcheck 60 150 compute-sanitizer --tool memcheck --error-exitcode 9 \
    "$PY" -m pytest "$SMOKE_TEST" -q -x -p no:cacheprovider
  local tool
  for tool in racecheck synccheck; do
    step "$tool" 60 120 compute-sanitizer --tool "$tool" --error-exitcode 9 \
      "$PY" -m pytest "$SMOKE_TEST" -q -x -p no:cacheprovider -k "zlpr or adax"
  done
}

stage_bench() {
  "$PY" -c "import pytest_benchmark" 2>/dev/null ||
    "$PY" -m pip install --no-index --find-links build/gpu-wheels pytest-benchmark \
      >"$LOGS/bench_install.log" 2>&1
  local op
  step bench_trained_linear 60 150 "$PY" benchmarks/run.py --out "$LOGS/bench" \
    -k "cuda and $TRAINED_BENCH"
  # One op per run: a deadline then loses only the ops not yet measured; run.py --out merges
  # each op's rows into the same CSV.
  # -k on the file name: "zlpr" alone would also select the two heads' files.
  for op in "${BENCH_OPS[@]}"; do
    step "bench_$op" 60 240 "$PY" benchmarks/run.py --out "$LOGS/bench" \
      -k "cuda and bench_$op and not $TRAINED_BENCH"
  done
}

stage_profile() {
  step profile 60 120 "$PY" "$PROFILER"
  step ncu 90 180 ncu --section SpeedOfLight --section MemoryWorkloadAnalysis \
    -k regex:'zlpr|adax|gate_' "$PY" "$PROFILER" --ncu zlpr sparse_zlpr adax gated_conv
}

STAGES=(build smoke test sanitize bench profile)
[ $# -gt 0 ] || { echo "usage: $0 all | ${STAGES[*]}" >&2; exit 2; }
[ "$1" = all ] && set -- "${STAGES[@]}"
for stage in "$@"; do
  case " ${STAGES[*]} " in
    *" $stage "*) ;;
    *) echo "unknown stage '$stage' (all | ${STAGES[*]})" >&2; exit 2 ;;
  esac
done

gpu=no
has_gpu && gpu=yes
for stage in "$@"; do
  if [ "$stage" != build ] && [ $gpu = no ]; then
    skip_no_gpu "$stage"
    continue
  fi
  "stage_$stage"
done

{
  echo "# kxops GPU check"
  echo
  echo "- git: $(git rev-parse --short HEAD 2>/dev/null || echo unknown); $(date -u +%FT%TZ)"
  echo "- GPU: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo none)"
  echo "- torch: $("$PY" -c 'import torch; print(torch.__version__, "cuda", torch.version.cuda)' 2>&1)"
  echo "- total: $((SECONDS - START)) s of a ${BUDGET_S} s budget"
  echo
  echo "| stage | verdict | time | last line |"
  echo "|---|---|---|---|"
  printf '%s\n' "${summary[@]}"
  for log in "$LOGS"/*.log; do
    [ -e "$log" ] || continue
    echo
    echo "## $(basename "$log" .log)"
    echo '```'
    grep -v '^\s*$' "$log" | tail -n 12 | cut -c1-200
    echo '```'
  done
} >"$OUT/summary.md"
cp "$OUT/summary.md" "$LOGS/"
tar -czf "$OUT/results.tar.gz" -C "$WORK" gpu_verify
rm -rf "$WORK"
echo "== wrote $OUT/summary.md and $OUT/results.tar.gz ($((SECONDS - START)) s)"
exit $status
