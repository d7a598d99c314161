#!/usr/bin/env bash
# GPU check of sidecar's memory plan, on wide Flux (real transformer width, real VAE):
# peak VRAM of each offload mode against the plan's estimate (within 15 %), and the
# backbone in 8 bits against bf16 (seconds and VRAM), written to a JSON file; then the
# compile time and speed-up of `--compile` (bench/gpu_compile.json). One run of at most
# 8 + 5 minutes; on a machine without CUDA it says so and exits 0. `--tests` also runs the
# CUDA-marked tests.
#
#   bash bench/gpu_check.sh [--tests]          # figures in bench/gpu_memory.json ($OUT/ if set)
#   PYTHON=/opt/sidecar/.venv/bin/python bash bench/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON=python3
LIMIT_SECONDS=470  # 8 minutes, less the start
COMPILE_LIMIT_SECONDS=300
RESULTS="${OUT:-bench}/gpu_memory.json"

if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_check: no CUDA device visible to torch here; nothing to check"
    exit 0
fi

timeout "$LIMIT_SECONDS" "$PYTHON" bench/gpu_memory.py --out "$RESULTS"

# --compile on the card: compile time (empty inductor cache) and per-image speed-up of wide Flux
# at 1024 px, two renderers of one base alternating (bench/compile_speed.py)
TORCHINDUCTOR_CACHE_DIR="$(mktemp -d)" timeout "$COMPILE_LIMIT_SECONDS" "$PYTHON" -m bench.compile_speed \
    --wide --arch flux --device cuda --size 1024 --steps 8 --out "${OUT:-bench}/gpu_compile.json" \
    || echo "gpu_check: the --compile measurement did not finish"

if [ "${1:-}" = "--tests" ]; then
    timeout "$LIMIT_SECONDS" "$PYTHON" -m pytest -q -p no:cacheprovider -m cuda tests/render
fi
