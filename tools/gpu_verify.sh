#!/usr/bin/env bash
# Issue 7 on a machine with an NVIDIA GPU, in stages that each fit one device call:
#   tools/gpu_verify.sh build      pip install -e . (CUDA archs of the visible GPU)
#   tools/gpu_verify.sh test       the whole suite, then the cuda-marked tests alone
#   tools/gpu_verify.sh sanitize   compute-sanitizer memcheck on each op's CUDA tests, racecheck
#                                  and synccheck on the ops whose kernels use shared memory
#   tools/gpu_verify.sh bench      make bench's suite on every device; results copied to $OUT
# Logs go to $OUT (default ./gpu_out); each stage prints a one-line verdict per step.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}

step() {  # step NAME COMMAND...: run, log to $OUT/NAME.log, print the verdict and the tail
  local name=$1
  shift
  "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "== $name: rc=$rc"
  tail -n 5 "$OUT/$name.log"
  return $rc
}

case "${1:-}" in
  build)
    step build "$PY" -m pip install --no-build-isolation --no-deps -e .
    "$PY" -m kxops | tee "$OUT/info.txt"
    ;;
  test)
    step tests_all "$PY" -m pytest tests -q -rs
    step tests_cuda "$PY" -m pytest tests -q -m cuda -rs
    ;;
  sanitize)
    for op in zlpr adax gated_conv; do
      step "memcheck_$op" compute-sanitizer --tool memcheck --error-exitcode 9 \
        "$PY" -m pytest "tests/test_$op.py" -q -m cuda -x -k "not 2_pow_31"
    done
    for tool in racecheck synccheck; do  # ZLPR's kernels use shared memory and barriers
      step "${tool}_zlpr" compute-sanitizer --tool "$tool" --error-exitcode 9 \
        "$PY" -m pytest tests/test_zlpr.py -q -m cuda -x -k "kernel and not 2_pow_31"
    done
    ;;
  bench)
    # The GPU machine has no network: pytest-benchmark comes from the wheels kept in tools/.
    "$PY" -c "import pytest_benchmark" 2>/dev/null ||
      "$PY" -m pip install --no-index --find-links tools/wheels pytest-benchmark >/dev/null
    step bench "$PY" benchmarks/run.py
    cp benchmarks/results/*.csv benchmarks/results/*.md benchmarks/results/*.png "$OUT/"
    ;;
  *)
    echo "usage: $0 build|test|sanitize|bench" >&2
    exit 2
    ;;
esac
