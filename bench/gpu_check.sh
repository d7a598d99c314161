#!/usr/bin/env bash
# GPU check of sidecar's memory plan, on wide Flux (real transformer width, real VAE):
# peak VRAM of each offload mode against the plan's estimate (within 15 %), and the
# backbone in 8 bits against bf16 (seconds and VRAM), written to a JSON file. One run
# of at most 8 minutes; on a machine without CUDA it says so and exits 0. `--tests`
# also runs the CUDA-marked tests.
#
#   bash bench/gpu_check.sh [--tests]          # figures in bench/gpu_memory.json ($OUT/ if set)
#   PYTHON=/opt/sidecar/.venv/bin/python bash bench/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON=python3
LIMIT_SECONDS=470  # 8 minutes, less the start
RESULTS="${OUT:-bench}/gpu_memory.json"

if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_check: no CUDA device visible to torch here; nothing to check"
    exit 0
fi

timeout "$LIMIT_SECONDS" "$PYTHON" bench/gpu_memory.py --out "$RESULTS"

if [ "${1:-}" = "--tests" ]; then
    timeout "$LIMIT_SECONDS" "$PYTHON" -m pytest -q -p no:cacheprovider -m cuda tests/render
fi
