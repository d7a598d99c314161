"""Throughput over a run: a trainer's checkpoints x its prompts, images per second, against the bare loop.

The simulated trainer saves a run's checkpoints back to back, faster than they render (a
backlog, as when sidecar catches up or the trainer outpaces it), each written in place in
chunks; the daemon takes them in while it renders. Its rate is the images over the time
from the first checkpoint whole to the last sample on disk. The bare loop renders the same
checkpoints in one process: per checkpoint `load_lora_weights`, one call per image, a PIL
save. The pure calls (their `__call__` time alone) bound both. One round per side, after a
warm-up checkpoint that loads the daemon's base; rounds alternate.
"""

from __future__ import annotations

import time

from bench.common import Figure, Profile, Stats, Workspace, alternate, progress, ratios
from bench.harness import SAMPLE_TIMEOUT_SECONDS, BarePipeline, DaemonHarness, wait_for_files
from sidecar.publish.files import sample_paths

SETTLE_SECONDS = 0.1
POLL_INTERVAL_SECONDS = 0.05
STEP_EVERY = 100
ROUNDS = 2


def run(workspace: Workspace, profile: Profile) -> list[Figure]:
    arch, size = profile.throughput_case.split("/")
    progress(
        f"throughput {arch}/{size}: {profile.throughput_checkpoints} checkpoints x "
        f"{profile.throughput_prompts} prompts"
    )
    model = workspace.model(arch, size)  # type: ignore[arg-type]
    folder = workspace.scratch(f"throughput-{arch}-{size}")
    rounds = 1 if profile.name == "quick" else ROUNDS
    count = profile.throughput_checkpoints
    bare = BarePipeline(model)
    pure: list[float] = []
    with DaemonHarness(
        folder,
        arch=arch,  # type: ignore[arg-type]
        model_folder=model,
        profile=profile,
        prompts=profile.throughput_prompts,
        steps=profile.steps,
        settle_seconds=SETTLE_SECONDS,
        poll_interval_seconds=POLL_INTERVAL_SECONDS,
    ) as daemon:
        requests = daemon.requests
        steps = {r: [STEP_EVERY * (r * count + n + 1) for n in range(count)] for r in range(rounds + 1)}
        data = {step: daemon.checkpoint_bytes(step) for r in steps for step in steps[r]}
        loras = {}
        for step, content in data.items():
            loras[step] = folder / "bare" / f"{step}.safetensors"
            loras[step].parent.mkdir(parents=True, exist_ok=True)
            loras[step].write_bytes(content)
        daemon.save(steps[0][0], data[steps[0][0]])  # warm-up: the base loads

        def daemon_side(number: int) -> float:
            run_steps = steps[number + 1]
            images = [sample_paths(daemon.samples_dir, s, r.index).image for s in run_steps for r in requests]
            first_whole = None
            for step in run_steps:  # a trainer ahead of the renders: saved back to back
                daemon.trainer.write_in_place(daemon.trainer.checkpoint_path(step), data[step])
                first_whole = first_whole or time.perf_counter()
            last = wait_for_files(images, alive=lambda: True, timeout=SAMPLE_TIMEOUT_SECONDS * count)
            return len(images) / (last - first_whole)

        def bare_side(number: int) -> float:
            started = time.perf_counter()
            calls = 0.0
            for step in steps[number + 1]:
                bare.pipe.unload_lora_weights()
                bare.pipe.load_lora_weights(str(loras[step]))
                calls += sum(bare.call_seconds(requests, folder / "bare" / f"step_{step:06d}"))
            pure.append(len(requests) * count / calls)
            return len(requests) * count / (time.perf_counter() - started)

        measured = alternate(rounds, daemon_side, bare_side)
    case = f"{arch}/{size}"
    settings = {
        "checkpoints": count,
        "images_per_checkpoint": len(requests),
        "steps": profile.steps,
        "size_pixels": profile.size_pixels,
    }
    daemon_rates = [r[0] for r in measured]
    bare_rates = [r[1] for r in measured]
    return [
        Figure("throughput", case, "daemon img/s", "img/s", Stats.of(daemon_rates), settings=settings),
        Figure("throughput", case, "bare loop img/s", "img/s", Stats.of(bare_rates), settings=settings),
        Figure("throughput", case, "pure __call__ img/s", "img/s", Stats.of(pure), settings=settings),
        Figure(
            "throughput", case, "daemon / bare loop", "x", ratios(daemon_rates, bare_rates), settings=settings
        ),
        Figure(
            "throughput", case, "daemon / pure __call__", "x", ratios(daemon_rates, pure), settings=settings
        ),
    ]
