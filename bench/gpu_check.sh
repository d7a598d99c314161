#!/usr/bin/env bash
# GPU smoke check of sidecar's memory modes: renders the tiny SDXL, SD 3.5 and Flux
# models on cuda:0 in each offload mode, printing time, peak VRAM and what is left
# on the card after `park`. Under 5 minutes; on a machine without CUDA it says so
# and exits 0. `--tests` also runs the CUDA-marked tests.
#
#   bash bench/gpu_check.sh [--tests]
#   PYTHON=/opt/sidecar/.venv/bin/python bash bench/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON=python3
LIMIT_SECONDS=280

if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_check: no CUDA device visible to torch here; nothing to check"
    exit 0
fi

timeout "$LIMIT_SECONDS" "$PYTHON" - <<'PY'
import logging
import time

import numpy as np
import torch

from sidecar import devices
from sidecar.tiny import build_pipeline

logging.basicConfig(level=logging.WARNING)
MIB = 1024**2
device = devices.resolve_device(device=None, gpu=0)
dtype = devices.resolve_dtype("auto", device)
print(f"device {device} ({torch.cuda.get_device_name(device)}), dtype {dtype}, torch {torch.__version__}")
print(f"{'arch':6} {'mode':11} {'seconds':>8} {'peak MiB':>9} {'after park MiB':>15}  image")


def render(pipe):
    generator = torch.Generator().manual_seed(0)
    out = pipe(prompt="a photo", height=64, width=64, num_inference_steps=4, output_type="np",
               generator=generator)
    return out.images


failures = 0
for arch in ("sdxl", "sd3", "flux"):
    warm = build_pipeline(arch).to(dtype=dtype)
    devices.apply_memory_mode(warm, "none", device)
    reference = render(warm)  # also warms up CUDA and cuBLAS, so timings below are fair
    devices.park(warm, device)
    del warm
    for mode in ("none", "model", "group", "sequential"):
        pipe = build_pipeline(arch).to(dtype=dtype)
        try:
            applied = devices.apply_memory_mode(pipe, mode, device)
            devices.reset_peak(device)
            torch.cuda.synchronize(device)
            start = time.perf_counter()
            images = render(pipe)
            torch.cuda.synchronize(device)
            seconds = time.perf_counter() - start
            peak = devices.peak_vram_bytes(device)
            devices.park(pipe, device)
            left = devices.allocated_bytes(device)
            ok = np.isfinite(images).all() and applied == mode
            diff = float(np.abs(images - reference).max())
            status = f"ok (max diff to none {diff:.3f})" if ok else f"BAD (applied {applied}, finite {np.isfinite(images).all()})"
            failures += not ok
            print(f"{arch:6} {mode:11} {seconds:8.2f} {peak / MIB:9.1f} {left / MIB:15.1f}  {status}")
        except Exception as exc:  # report every mode, then fail at the end
            failures += 1
            print(f"{arch:6} {mode:11} FAILED: {type(exc).__name__}: {exc}")
        del pipe
        devices.free_cuda_cache(device)

raise SystemExit(1 if failures else 0)
PY

if [ "${1:-}" = "--tests" ]; then
    timeout "$LIMIT_SECONDS" "$PYTHON" -m pytest -q -m cuda tests/test_devices.py
fi
