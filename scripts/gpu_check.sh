#!/usr/bin/env bash
# GPU check for the device machine (no network; torch and triton preinstalled):
#   bash scripts/gpu_check.sh OUT_DIR
# installs nnfast without dependencies, runs the test suite on CUDA (every dtype incl. bf16)
# and the benchmarks, and writes OUT_DIR/<gpu>-<date>/report.md with GPU, driver, torch and
# triton versions, the test summary, the benchmark tables and PNG plots.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_ROOT=${1:?usage: gpu_check.sh OUT_DIR}
PY=${PYTHON:-python3}
unset TRITON_INTERPRET NNFAST_BACKEND
$PY -m pip install -q --no-deps --no-build-isolation -e . || { echo "install failed"; exit 1; }

GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
SLUG=$(echo "$GPU" | tr 'A-Z' 'a-z' | sed -E 's/nvidia //; s/[^a-z0-9]+/-/g; s/-+$//')
OUT="$OUT_ROOT/$SLUG-$(date +%F)"
mkdir -p "$OUT"
export TIKTOKEN_CACHE_DIR=${TIKTOKEN_CACHE_DIR:-$PWD/.device/tiktoken_cache}
[ -d .device/data ] && export NNFAST_DATA_DIR=${NNFAST_DATA_DIR:-$PWD/.device/data}

{
  echo "# nnfast GPU check — $GPU — $(date +%F)"
  echo
  echo "| what | value |"
  echo "|---|---|"
  echo "| GPU | $GPU |"
  echo "| driver | $(nvidia-smi --query-gpu=driver_version --format=csv,noheader | head -1) |"
  echo "| torch | $($PY -c 'import torch; print(torch.__version__, "CUDA", torch.version.cuda)') |"
  echo "| triton | $($PY -c 'import triton; print(triton.__version__)') |"
  echo "| nnfast commit | $(git rev-parse --short HEAD 2>/dev/null || echo unknown) |"
  echo
} > "$OUT/header.md"

$PY -m pytest tests -q -rs -p no:cacheprovider --junitxml="$OUT/tests.xml" > "$OUT/tests.log" 2>&1
TEST_RC=$?
{
  echo "## Tests on CUDA (exit code $TEST_RC)"
  echo
  echo '```'
  grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/tests.log" | tail -40
  echo '```'
} >> "$OUT/header.md"

$PY -m pytest benchmarks --benchmark-only -q -p no:cacheprovider \
  --benchmark-json="$OUT/bench.json" > "$OUT/bench.log" 2>&1
BENCH_RC=$?
echo -e "\nBenchmarks exit code: $BENCH_RC\n" >> "$OUT/header.md"
$PY scripts/bench_report.py "$OUT/bench.json" --out "$OUT" --header "$OUT/header.md"
echo "report: $OUT/report.md (tests rc=$TEST_RC, benchmarks rc=$BENCH_RC)"
