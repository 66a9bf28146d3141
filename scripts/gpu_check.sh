#!/usr/bin/env bash
# GPU check for the device machine (no network; torch and triton preinstalled):
#   bash scripts/gpu_check.sh OUT_DIR [BUDGET_S]      # e.g. OUT_DIR=$OUT, BUDGET_S=720
#   bash scripts/gpu_check.sh OUT_DIR --dry-run       # CPU, tiny sizes (what CI runs)
# Installs nnfast without dependencies (and Liger-Kernel from .device/wheels when
# scripts/stage_device.sh put its wheel there), writes a header with the GPU, driver, torch
# and triton versions, then runs the staged check (scripts/gpu_check.py: kernels vs
# reference, benchmarks, GPT-2 training step, test suite), which appends each stage to
# OUT_DIR/report.md as it finishes, so a run cut short still reports.
#
# Budget: 15 minutes of device time include the machine's start (1-2 min) and the
# transfers, so the default 720 s leaves room; the command's timeout_s should be ~60 s more.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: gpu_check.sh OUT_DIR [BUDGET_S | --dry-run]}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
if [ "${2:-}" = "--dry-run" ]; then
  export TIKTOKEN_CACHE_DIR=${TIKTOKEN_CACHE_DIR:-}
  exec "$PY" scripts/gpu_check.py "$OUT" --dry-run
fi
BUDGET=${2:-720}
START=$(date +%s)
unset TRITON_INTERPRET NNFAST_BACKEND
$PY -m pip install -q --no-deps --no-build-isolation -e . || { echo "install failed"; exit 1; }
if ls .device/wheels/liger_kernel-*.whl >/dev/null 2>&1; then
  # No network on the device: the wheel travels in the carried .device folder.
  $PY -m pip install -q --no-index --no-deps --target /tmp/site .device/wheels/liger_kernel-*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export TIKTOKEN_CACHE_DIR=${TIKTOKEN_CACHE_DIR:-$PWD/.device/tiktoken_cache}
[ -d .device/data ] && export NNFAST_DATA_DIR=${NNFAST_DATA_DIR:-$PWD/.device/data}

GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
{
  echo "# nnfast GPU check — $GPU — $(date +%F)"
  echo
  echo "| what | value |"
  echo "|---|---|"
  echo "| GPU | $GPU |"
  echo "| driver | $(nvidia-smi --query-gpu=driver_version --format=csv,noheader | head -1) |"
  echo "| torch | $($PY -c 'import torch; print(torch.__version__, "CUDA", torch.version.cuda)') |"
  echo "| triton | $($PY -c 'import triton; print(triton.__version__)') |"
  echo "| liger-kernel | $($PY -c 'import importlib.metadata as m; print(m.version("liger-kernel"))' 2>/dev/null || echo 'not installed: its cases skip') |"
  echo "| nnfast commit | $(git rev-parse --short HEAD 2>/dev/null || echo unknown) |"
  echo
} > /tmp/gpu_check_header.md
LEFT=$(( BUDGET - ($(date +%s) - START) ))
$PY scripts/gpu_check.py "$OUT" --budget-s "$LEFT" --header /tmp/gpu_check_header.md
