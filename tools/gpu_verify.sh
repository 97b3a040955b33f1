#!/usr/bin/env bash
# Issue 7 on a machine with an NVIDIA GPU. Stages, any number per call, run in order:
#   build      the extension in place (ninja, incremental; archs of the visible GPU) + kxops info
#   test       the whole suite (the cuda-marked tests included), slowest tests listed
#   sanitize   compute-sanitizer memcheck on each op's CUDA tests, racecheck and synccheck on
#              ZLPR (the kernels with shared memory and barriers); sanitize-OP: one op's
#   bench      the benchmark suite on CUDA only; results/<gpu>.csv, .md and PNGs copied to $OUT
#   bench-OP   the same for one op's cases (adax, zlpr: both ZLPRs, gated_conv); the rows of
#              the other ops already in results/<gpu>.csv are kept, so copy the files from $OUT
#              into benchmarks/results/ between device calls (each call gets a fresh tree copy)
#   profile    tools/profile_cuda.py (each op's CUDA kernels, torch.profiler) and Nsight Compute
#              speed-of-light and memory sections of each op's own kernels, to $OUT
# e.g. `build test`, `sanitize`, then `bench-zlpr bench-adax` and `bench-gated_conv` (sanitizers
# and the torch.compile peers make whole-suite calls risky under a 10-minute limit). Every
# stage builds first, so a call that lands on a fresh machine still works (it pays the build).
# Logs go to $OUT (default ./gpu_out); each step prints its verdict and the tail of its log.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
status=0

step() {  # step NAME COMMAND...: run, log to $OUT/NAME.log, print the verdict and the tail
  local name=$1
  shift
  local start=$SECONDS
  "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "== $name: rc=$rc ($((SECONDS - start)) s)"
  tail -n 5 "$OUT/$name.log"
  [ $rc -eq 0 ] || status=1
  return $rc
}

build() {
  step build "$PY" setup.py build_ext --inplace || return 1
  "$PY" -m kxops >"$OUT/info.txt" 2>&1
}

[ $# -gt 0 ] || { echo "usage: $0 build|test|sanitize[-OP]|profile|bench[-OP] ..." >&2; exit 2; }
for stage in "$@"; do
  case "$stage" in
    build)
      build && cat "$OUT/info.txt"
      ;;
    test)
      build && step tests "$PY" -m pytest tests -q -rs --durations=15
      ;;
    sanitize | sanitize-*)
      build || continue
      ops="zlpr adax gated_conv"
      [ "$stage" = sanitize ] || ops=${stage#sanitize-}
      for op in $ops; do
        step "memcheck_$op" compute-sanitizer --tool memcheck --error-exitcode 9 \
          "$PY" -m pytest "tests/test_$op.py" -q -m cuda -x -k "not 2_pow_31"
        [ "$op" = zlpr ] || continue
        for tool in racecheck synccheck; do  # the kernels with shared memory and barriers
          step "${tool}_zlpr" compute-sanitizer --tool "$tool" --error-exitcode 9 \
            "$PY" -m pytest tests/test_zlpr.py -q -m cuda -x -k "kernel and not 2_pow_31"
        done
      done
      ;;
    profile)
      build || continue
      step profile "$PY" tools/profile_cuda.py
      for op in zlpr sparse_zlpr adax gated_conv; do
        step "ncu_$op" ncu --section SpeedOfLight --section MemoryWorkloadAnalysis \
          -k regex:'zlpr|adax|gate_' "$PY" tools/profile_cuda.py --ncu "$op"
      done
      ;;
    bench | bench-*)
      build || continue
      # The GPU machine has no network: pytest-benchmark comes from the wheels kept in tools/.
      "$PY" -c "import pytest_benchmark" 2>/dev/null ||
        "$PY" -m pip install --no-index --find-links tools/wheels pytest-benchmark >/dev/null
      # CUDA cases only: this machine's CPU is not the one the committed CPU results describe.
      cases="cuda"
      [ "$stage" = bench ] || cases="cuda and ${stage#bench-}"
      step "$stage" "$PY" benchmarks/run.py -k "$cases" &&
        find benchmarks/results -maxdepth 1 -type f ! -name 'cpu*' ! -name '*.json' \
          -exec cp {} "$OUT/" \;
      ;;
    *)
      echo "unknown stage '$stage' (build|test|sanitize[-OP]|profile|bench[-OP])" >&2
      exit 2
      ;;
  esac
done
exit $status
