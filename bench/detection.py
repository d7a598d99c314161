"""Detection latency: checkpoint whole -> its render starts, over checkpoints written in place.

The simulated trainer writes each checkpoint in chunks (a reader sees half a file), then
pauses a random while, as training between saves; the daemon must notice the file,
know it is ready (whole and closed by its writer: inotify's `IN_CLOSE_WRITE`; else settled),
copy and record it, swap its LoRA in and start the first pipeline call. One image of one
step per checkpoint, so the renders stay short.

Measured twice: with the default `Settings` (`settle_seconds` 1.0, `poll_interval_seconds`
1.0; the figure with the target, 1.06 s before close events counted), and with a small
settle and idle back-off.
"""

from __future__ import annotations

import random
import time

from bench.common import Figure, Profile, Stats, Target, Workspace, progress
from bench.harness import DaemonHarness
from sidecar.settings import POLL_INTERVAL_SECONDS as DEFAULT_POLL_INTERVAL_SECONDS
from sidecar.settings import SETTLE_SECONDS as DEFAULT_SETTLE_SECONDS

SETTLE_SECONDS = 0.1
POLL_INTERVAL_SECONDS = 0.05
TARGET = Target("<=", 0.2)  # with a small settle
TARGET_DEFAULTS = Target("<=", 0.05)  # with the defaults: a closed, whole file is ready at once
ARCH = "sdxl"
SIZE = "shallow"
PAUSE_SECONDS = (0.05, 0.3)  # "training" between two saves: uniform in this range
STEP_EVERY = 100


def run(workspace: Workspace, profile: Profile) -> list[Figure]:
    tuned = measure(
        workspace,
        profile.detection_checkpoints,
        settle_seconds=SETTLE_SECONDS,
        poll_seconds=POLL_INTERVAL_SECONDS,
    )
    defaults = measure(
        workspace, profile.detection_checkpoints_default, settle_seconds=None, poll_seconds=None
    )
    tuned_settings = {"settle_seconds": SETTLE_SECONDS, "poll_interval_seconds": POLL_INTERVAL_SECONDS}
    default_settings = {
        "settle_seconds": DEFAULT_SETTLE_SECONDS,
        "poll_interval_seconds": DEFAULT_POLL_INTERVAL_SECONDS,
    }
    case = f"{ARCH}/{SIZE}"
    return [
        Figure(
            "detection", case, f"settle {SETTLE_SECONDS:g} s", "s", tuned, TARGET, settings=tuned_settings
        ),
        Figure(
            "detection",
            case,
            f"settle {SETTLE_SECONDS:g} s, p95",
            "s",
            tuned,
            statistic="p95",
            settings=tuned_settings,
        ),
        Figure("detection", case, "defaults", "s", defaults, TARGET_DEFAULTS, settings=default_settings),
    ]


def measure(
    workspace: Workspace, checkpoints: int, *, settle_seconds: float | None, poll_seconds: float | None
) -> Stats:
    label = "defaults" if settle_seconds is None else f"settle {settle_seconds:g} s"
    progress(f"detection {ARCH}/{SIZE}, {label}, {checkpoints} checkpoint(s)")
    model = workspace.model(ARCH, SIZE)
    folder = workspace.scratch(f"detection-{label.replace(' ', '-')}")
    pauses = random.Random(0)
    with DaemonHarness(
        folder,
        arch=ARCH,
        model_folder=model,
        profile=workspace.profile,
        prompts=1,
        steps=1,
        settle_seconds=settle_seconds,
        poll_interval_seconds=poll_seconds,
    ) as daemon:
        steps = [STEP_EVERY * (number + 1) for number in range(checkpoints + 1)]
        data = {step: daemon.checkpoint_bytes(step) for step in steps}
        daemon.save(steps[0], data[steps[0]])  # warm-up: the base model loads here
        latencies = []
        for step in steps[1:]:
            time.sleep(pauses.uniform(*PAUSE_SECONDS))
            latencies.append(daemon.save(step, data[step]).detection_seconds)
    return Stats.of(latencies)
