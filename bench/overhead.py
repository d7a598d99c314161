"""Overhead: checkpoint whole -> last sample on disk with the daemon, over bare diffusers calls.

Per architecture and size, in one process: the daemon (`bench.harness.DaemonHarness`)
renders each checkpoint a simulated trainer writes, and `BarePipeline` renders the
same checkpoint's requests (same prompts, seeds, steps, sizes) with `load_lora_weights`,
plain pipeline calls and PIL saves. The two sides alternate per checkpoint.

The daemon's time includes detection (a file closed by its writer is ready at once; the
settle wait is the fallback) and its idle back-off (`poll_interval_seconds`).
`call_overhead.py` holds the daemon to the stricter bar, the pipeline's own calls.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from bench.common import (
    Figure,
    Profile,
    Size,
    Stats,
    Target,
    Workspace,
    alternate,
    each_case,
    progress,
    ratios,
    timed,
)
from bench.harness import BarePipeline, CheckpointTiming, DaemonHarness
from sidecar.arch import Arch
from sidecar.publish.files import sample_paths

SETTLE_SECONDS = 0.1
POLL_INTERVAL_SECONDS = 0.05
TARGET = Target("<=", 1.10)
STEP_EVERY = 100


def run(workspace: Workspace, profile: Profile) -> list[Figure]:
    return each_case(workspace, profile, measure)


def measure(workspace: Workspace, profile: Profile, arch: Arch, size: Size) -> list[Figure]:
    progress(f"overhead {arch}/{size}")
    model = workspace.model(arch, size)
    folder = workspace.scratch(f"overhead-{arch}-{size}")
    bare = BarePipeline(model)
    timings: list[CheckpointTiming] = []
    with DaemonHarness(
        folder,
        arch=arch,
        model_folder=model,
        profile=profile,
        prompts=profile.prompts,
        steps=profile.steps,
        settle_seconds=SETTLE_SECONDS,
        poll_interval_seconds=POLL_INTERVAL_SECONDS,
    ) as daemon:
        requests = daemon.requests
        steps = [STEP_EVERY * (number + 1) for number in range(profile.repeats + 1)]
        loras = {}
        for step in steps:  # both sides render the same checkpoint's bytes
            data = daemon.checkpoint_bytes(step)
            loras[step] = folder / "bare" / f"{step}.safetensors"
            loras[step].parent.mkdir(parents=True, exist_ok=True)
            loras[step].write_bytes(data)

        def daemon_side(number: int) -> float:
            step = steps[number]
            timing = daemon.save(step, loras[step].read_bytes())
            timings.append(timing)
            return timing.total_seconds

        def bare_side(number: int) -> float:
            step = steps[number]
            out = folder / "bare" / f"step_{step:06d}"
            return timed(lambda: bare.render_checkpoint(loras[step], requests, out))

        alternate(1, daemon_side, bare_side)  # warm-up: the daemon loads its base model here
        timings.clear()
        rounds = alternate(profile.repeats, lambda n: daemon_side(n + 1), lambda n: bare_side(n + 1))
        last = steps[-1]
        difference = _max_pixel_difference(
            sample_paths(daemon.samples_dir, last, requests[-1].index).image,
            folder / "bare" / f"step_{last:06d}" / f"sample_{requests[-1].index:02d}.png",
        )

    case = f"{arch}/{size}"
    settings = {
        "settle_seconds": SETTLE_SECONDS,
        "poll_interval_seconds": POLL_INTERVAL_SECONDS,
        "images_per_checkpoint": len(requests),
        "steps": profile.steps,
        "size_pixels": profile.size_pixels,
        "max_pixel_difference_daemon_vs_bare": difference,
        "daemon_detection_seconds_median": Stats.of([t.detection_seconds for t in timings]).median,
    }
    daemon_seconds = [pair[0] for pair in rounds]
    bare_seconds = [pair[1] for pair in rounds]
    return [
        Figure(
            "overhead",
            case,
            "daemon / bare",
            "x",
            ratios(daemon_seconds, bare_seconds),
            TARGET,
            settings=settings,
        ),
        Figure("overhead", case, "daemon s/checkpoint", "s", Stats.of(daemon_seconds), settings=settings),
        Figure("overhead", case, "bare s/checkpoint", "s", Stats.of(bare_seconds), settings=settings),
    ]


def _max_pixel_difference(first: Path, second: Path) -> float:
    """Largest per-channel difference (0-255) of two images: both sides must render the same thing."""
    a = np.asarray(Image.open(first), dtype=np.int16)
    b = np.asarray(Image.open(second), dtype=np.int16)
    return float(np.abs(a - b).max())
