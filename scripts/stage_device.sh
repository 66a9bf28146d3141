#!/usr/bin/env bash
# Prepare the git-ignored .device/ folder that a device call carries (the device machine
# has no network): Liger-Kernel's wheel (a pure-Python wheel, so one file fits the device's
# Python 3.12; --no-deps: its needs, torch and triton, are installed there), the tiktoken
# cache and the data, when they exist beside the checkout. Then, on the device:
#   run(command="bash scripts/gpu_check.sh $OUT 720", carry=[".device"], timeout_s=600)
# (.gitignore lists .device/: carried paths must be git-ignored; 64 MiB in all).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .device/wheels
PY=${PYTHON:-python3}
$PY -m pip download -q --no-deps --only-binary=:all: -d .device/wheels "liger-kernel${LIGER_VERSION:+==$LIGER_VERSION}"
[ -d ../shared/tiktoken_cache ] && cp -r ../shared/tiktoken_cache .device/
if [ -f ../shared/data/tinyshakespeare.txt ]; then
  mkdir -p .device/data && cp ../shared/data/tinyshakespeare.txt .device/data/
fi
du -sh .device
