"""Overhead against the pure `__call__`: checkpoint whole -> last sample on disk, over the bare calls.

The bar is the pipeline's own time: the sum of its `__call__`s for the checkpoint's
requests, its LoRA already applied, nothing else (no LoRA loading, no prompt cache, no
files). Everything sidecar adds around it is overhead: detection, copy, hashing, store
writes, swap, PNG encoding and sample files; grid, gallery and TensorBoard run on the
publisher's thread and count only where they take the render path's time.

Per architecture, on the deep tiny models and the wide ones (real layer widths, a rank-16
LoRA of the trainers' default layers), in one process: the daemon (`DaemonHarness`, with
TensorBoard on) renders each checkpoint a simulated trainer writes, and `BarePipeline`
renders the same requests with the same LoRA applied; the two alternate per checkpoint.
`PhaseRecorder` times the daemon's phases; `phases` figures give each one's milliseconds
per checkpoint on the render path, and what ran beside it (`off path`).
"""

from __future__ import annotations

import dataclasses

from bench.common import Figure, Profile, Size, Stats, Target, Workspace, alternate, progress
from bench.harness import BarePipeline, CheckpointTiming, DaemonHarness
from bench.phases import PHASES, PhaseRecorder
from sidecar.arch import Arch
from sidecar.render.registry import renderer_class

SETTLE_SECONDS = 0.1
POLL_INTERVAL_SECONDS = 0.05
TARGET = Target("<=", 1.05)
STEP_EVERY = 100
RANKS: dict[Size, int] = {"shallow": 4, "deep": 4, "wide": 16}
MS = 1000.0


def run(workspace: Workspace, profile: Profile) -> list[Figure]:
    return [
        figure
        for size in profile.call_sizes
        for arch in profile.archs
        for figure in measure(workspace, profile, arch, size)
    ]


def measure(workspace: Workspace, profile: Profile, arch: Arch, size: Size) -> list[Figure]:
    progress(f"call_overhead {arch}/{size}")
    wide = size == "wide"
    steps = profile.wide_steps if wide else profile.steps
    prompts = 1 if wide else profile.prompts
    repeats = profile.wide_repeats if wide else profile.repeats
    model = workspace.model(arch, size)
    folder = workspace.scratch(f"call-overhead-{arch}-{size}")
    checkpoints = [STEP_EVERY * (number + 1) for number in range(repeats + 1)]
    loras = {
        step: workspace.trainer_lora(arch, size, seed=1, rank=RANKS[size], scale=step / 200)
        for step in checkpoints
    }
    bare = BarePipeline(model)
    tensorboard = folder / "tensorboard" if _tensorboard_installed() else None
    timings: list[CheckpointTiming] = []
    recorder = PhaseRecorder(renderer_class(arch).pipeline_class)
    with (
        recorder,
        DaemonHarness(
            folder,
            arch=arch,
            model_folder=model,
            profile=dataclasses.replace(profile, steps=steps),
            prompts=prompts,
            steps=steps,
            settle_seconds=SETTLE_SECONDS,
            poll_interval_seconds=POLL_INTERVAL_SECONDS,
            tensorboard=tensorboard,
        ) as daemon,
    ):
        requests = daemon.requests

        def daemon_side(number: int) -> float:
            step = checkpoints[number]
            timing = daemon.save(step, loras[step].read_bytes())
            timings.append(timing)
            return timing.total_seconds

        def bare_side(number: int) -> float:
            step = checkpoints[number]
            bare.pipe.unload_lora_weights()
            bare.pipe.load_lora_weights(str(loras[step]))  # not timed: the LoRA is in place
            return sum(bare.call_seconds(requests, folder / "bare" / f"step_{step:06d}"))

        alternate(1, daemon_side, bare_side)  # warm-up: the daemon loads its base model here
        timings.clear()
        rounds = alternate(repeats, lambda n: daemon_side(n + 1), lambda n: bare_side(n + 1))
    # after the daemon stopped: the spans still open when a sample appeared (its fsyncs) are in
    phases = [recorder.breakdown(timing.whole, timing.last_sample) for timing in timings]
    return _figures(
        f"{arch}/{size}",
        [timing.total_seconds for timing in timings],
        [pair[1] for pair in rounds],
        phases,
        settings={
            "settle_seconds": SETTLE_SECONDS,
            "poll_interval_seconds": POLL_INTERVAL_SECONDS,
            "images_per_checkpoint": len(requests),
            "steps": steps,
            "size_pixels": profile.size_pixels,
            "lora": f"peft, rank {RANKS[size]}, the trainers' default layers",
            "lora_mib": round(loras[checkpoints[-1]].stat().st_size / 2**20, 1),
            "tensorboard": tensorboard is not None,
        },
    )


def _figures(
    case: str,
    daemon_seconds: list[float],
    call_seconds: list[float],
    phases: list[tuple[dict[str, float], dict[str, float]]],
    *,
    settings: dict,
) -> list[Figure]:
    ratios = Stats.of([d / c for d, c in zip(daemon_seconds, call_seconds, strict=True)])
    figures = [
        Figure("call_overhead", case, "daemon / pure __call__", "x", ratios, TARGET, settings=settings),
        Figure(
            "call_overhead", case, "daemon s/checkpoint", "s", Stats.of(daemon_seconds), settings=settings
        ),
        Figure(
            "call_overhead",
            case,
            "pure __call__ s/checkpoint",
            "s",
            Stats.of(call_seconds),
            settings=settings,
        ),
    ]
    for phase in PHASES:
        values = [on_path[phase] * MS for on_path, _ in phases]
        figures.append(Figure("phases", case, phase, "ms", Stats.of(values), settings=settings))
    off_phases = sorted({phase for _, off_path in phases for phase in off_path}, key=PHASES.index)
    for phase in off_phases:
        values = [off_path.get(phase, 0.0) * MS for _, off_path in phases]
        figures.append(
            Figure("phases", case, f"{phase} (off path)", "ms", Stats.of(values), settings=settings)
        )
    return figures


def _tensorboard_installed() -> bool:
    from sidecar.publish.tensorboard import tensorboard_installed

    return tensorboard_installed()
