"""Worker pool: images/s with 1 and 2 Ray CPU workers on one run; the coordinator's own cost per image.

*Scaling.* One run of `CHECKPOINTS` checkpoints x `PROMPTS_PER_CHECKPOINT` prompts (the
deep tiny SDXL, 64 px), rendered by `sidecar watch --runs` on a local Ray with 1, then 2
CPU workers (one torch thread each), alternating. Images/s counts from the first claim
to the last sample marked done in the run's store, so Ray's start, the workers' first
load and the coordinator's exit are not in it; the per-checkpoint publishing (grid,
gallery) is. On a 2-core machine the second worker shares the cores with the
coordinator's own threads, and with anything else running there: the *machine ceiling*
(2 processes of a pure-Python loop over 1, measured right after) says what a second
worker could gain at the time, 2.0 on two idle cores.

*Coordinator cost.* The same coordinator with the in-process pool and a worker that
returns a ready 1024 x 1024 image at once: what is left per image is the coordinator's
own work (job store, the PNG written atomically with its metadata, the step grid and the
gallery, the turn through the scheduler). From it the README works out, on paper, how
many GPU workers one coordinator can feed.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from bench.common import (
    PROFILES,
    PROMPTS,
    Figure,
    Profile,
    Stats,
    Target,
    Workspace,
    alternate,
    progress,
    ratios,
    sample_requests,
    timed,
)
from sidecar.app.coordinator import CoordinatorRequest, run_coordinator
from sidecar.app.worker import LocalPool, PoolOptions, RenderWorker
from sidecar.jobs.store import JobStore
from sidecar.publish.files import write_sample
from sidecar.settings import SamplesFolder
from sidecar.testing.loras import write_lora
from sidecar.testing.trainer import write_trainer_config

SPEEDUP_TARGET = Target(">=", 1.6)
RENDER_PIXELS = 64
RENDER_STEPS = 4  # the deep tiny SDXL at 64 px, 4 steps: about 0.5 s per image on one thread
PROMPTS_PER_CHECKPOINT = 4
COST_PIXELS = 1024  # the coordinator's cost is measured on images of real size
COST_CHECKPOINTS = 4
OBJECT_STORE_BYTES = 200 * 1024 * 1024
SETTINGS = {"settle_seconds": 0.1, "poll_interval_seconds": 0.05, "device": "cpu"}


def run(workspace: Workspace, profile: Profile) -> list[Figure]:
    try:
        import ray  # noqa: F401  (the `ray` extra)
    except ImportError:
        progress("pool: skipped, Ray is not installed (pip install 'sidecar[ray]')")
        return []
    return scaling(workspace, profile) + coordinator_cost(workspace, profile)


def _checkpoints(profile: Profile) -> int:
    return 2 if profile.name == "quick" else 6


def _run(workspace: Workspace, model: Path, name: str, *, checkpoints: int, pixels: int) -> Path:
    """A trainer's run folder with its checkpoints written, and a runs file naming it."""
    root = workspace.scratch(f"pool-{name}")
    output = root / "training" / name
    output.mkdir(parents=True)
    config = write_trainer_config(
        root / "config.yaml",
        model_folder=model,
        training_folder=root / "training",
        name=name,
        prompts=[PROMPTS[index % len(PROMPTS)] for index in range(PROMPTS_PER_CHECKPOINT)],
        size_pixels=pixels,
        sample_steps=RENDER_STEPS,
        save_every=1,
    )
    for number in range(checkpoints):
        step = (number + 1) * 100
        path = output / f"{name}_{step:09d}.safetensors"
        write_lora(model, "sdxl", path, lora_format="kohya", seed=step, scale=0.5)
    runs_file = root / "runs.yaml"
    runs_file.write_text(f"- output: {output}\n  config: {config}\n")
    return runs_file


BURN_LOOPS = 5_000_000  # a pure-Python loop: about a second of one core


def _burn(loops: int) -> int:
    total = 0
    for number in range(loops):
        total += number * number
    return total


def machine_ceiling(repeats: int) -> list[float]:
    """Work per second of 2 processes over 1 (a pure-Python loop each): what 2 workers can gain
    on this machine now, whatever else runs on it; 2.0 on two idle cores."""
    import multiprocessing

    def rate(processes: int) -> float:
        with multiprocessing.get_context("spawn").Pool(processes) as pool:
            pool.map(_burn, [1000] * processes)  # the processes are up before the clock starts
            started = time.perf_counter()
            pool.map(_burn, [BURN_LOOPS] * processes)
            return processes / (time.perf_counter() - started)

    return [rate(2) / rate(1) for _ in range(repeats)]


def _images_per_second(runs_file: Path) -> tuple[int, float]:
    """(images, seconds from the first claim to the last checkpoint done), from the run's store."""
    output = Path(runs_file.read_text().split("output: ")[1].split("\n")[0])
    with JobStore(SamplesFolder(output / "samples").jobs) as store:
        jobs = store.checkpoints()
        started = min(job.started_at for job in jobs if job.started_at is not None)
        finished = max(job.finished_at for job in jobs if job.finished_at is not None)
        done = [sample for job in jobs for sample in store.samples(job.id) if sample.state == "done"]
    return len(done), finished - started


def _coordinate(runs_file: Path, pool) -> None:
    code = run_coordinator(CoordinatorRequest(runs_file, dict(SETTINGS), once=True), pool=pool)
    if code != 0:
        raise RuntimeError(f"the coordinator exited {code} on {runs_file}")


def scaling(workspace: Workspace, profile: Profile) -> list[Figure]:
    import ray

    from sidecar.app.pool import RayPool, init_ray

    progress("pool: 1 and 2 Ray CPU workers")
    model = workspace.model("sdxl", "deep")
    started_ray = init_ray("local", object_store_bytes=OBJECT_STORE_BYTES, num_cpus=2)
    both = RayPool.start(PoolOptions(ray="local", workers=2, device="cpu"))
    pools = {1: RayPool(both.actors[:1]), 2: both}  # 2 CPUs hold 2 workers: the first serves alone
    try:
        for count, pool in pools.items():  # warm-up: each worker loads the base once
            _coordinate(_run(workspace, model, f"warm{count}", checkpoints=count, pixels=RENDER_PIXELS), pool)
        rates: dict[int, list[float]] = {1: [], 2: []}

        def side(count: int):
            def measure(number: int) -> float:
                name, checkpoints = f"w{count}r{number}", _checkpoints(profile)
                runs_file = _run(workspace, model, name, checkpoints=checkpoints, pixels=RENDER_PIXELS)
                _coordinate(runs_file, pools[count])
                images, seconds = _images_per_second(runs_file)
                rates[count].append(images / seconds)
                return seconds

            return measure

        alternate(profile.repeats, side(1), side(2))
        ceiling = machine_ceiling(profile.repeats)
    finally:
        both.close()
        if started_ray:
            ray.shutdown()
    settings = {
        "checkpoints": _checkpoints(profile),
        "images_per_checkpoint": PROMPTS_PER_CHECKPOINT,
        "size_pixels": RENDER_PIXELS,
        "steps": RENDER_STEPS,
        "model": "sdxl/deep",
        "torch_threads_per_worker": 1,
    }
    return [
        Figure("pool", "1 CPU worker", "img/s", "img/s", Stats.of(rates[1]), settings=settings),
        Figure("pool", "2 CPU workers", "img/s", "img/s", Stats.of(rates[2]), settings=settings),
        Figure(
            "pool",
            "2 / 1 workers",
            "speedup",
            "x",
            ratios(rates[2], rates[1]),
            SPEEDUP_TARGET,
            settings=settings,
        ),
        Figure("pool", "2 / 1 busy processes", "machine ceiling", "x", Stats.of(ceiling)),
    ]


class ReadyImages:
    """A worker's renderer that makes nothing: each request gets the same finished image at once."""

    def __init__(self, image: Image.Image) -> None:
        self.image = image

    def apply_lora(self, path: Path) -> None:
        """Nothing to apply."""

    def render_resilient(self, requests: Sequence, *, batch_size: int = 1):
        for request in requests:
            yield request, self.image


def photo_like(pixels: int, *, seed: int = 0) -> Image.Image:
    """Smooth shapes with fine grain: compresses like a rendered sample, unlike pure noise."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).resize(
        (pixels, pixels), Image.Resampling.BICUBIC
    )
    grain = rng.integers(-6, 7, (pixels, pixels, 3))
    return Image.fromarray(np.clip(np.asarray(coarse, dtype=np.int16) + grain, 0, 255).astype(np.uint8))


def coordinator_cost(workspace: Workspace, profile: Profile) -> list[Figure]:
    progress(f"pool: the coordinator's own cost per {COST_PIXELS} px image")
    model = workspace.model("sdxl", "shallow")  # named in the config, never loaded
    image = photo_like(COST_PIXELS)
    pool = LocalPool(RenderWorker(renderer_factory=lambda spec, device, gpu: ReadyImages(image)))
    checkpoints = 2 if profile.name == "quick" else COST_CHECKPOINTS
    costs: list[float] = []
    try:
        for number in range(profile.repeats):
            runs_file = _run(workspace, model, f"cost{number}", checkpoints=checkpoints, pixels=COST_PIXELS)
            _coordinate(runs_file, pool)
            images, seconds = _images_per_second(runs_file)
            costs.append(seconds / images)
    finally:
        pool.close()
    settings = {
        "size_pixels": COST_PIXELS,
        "images_per_checkpoint": PROMPTS_PER_CHECKPOINT,
        "checkpoints": checkpoints,
        "includes": "job store, PNG with infotext written atomically, step grid, gallery, scheduler",
    }
    case = f"coordinator, {COST_PIXELS} px"
    writes = _png_writes(workspace, image, profile.repeats)
    return [
        Figure("pool", case, "s/image", "s", Stats.of(costs), settings=settings),
        Figure("pool", case, "PNG write s/image", "s", Stats.of(writes)),
    ]


def _png_writes(workspace: Workspace, image: Image.Image, repeats: int) -> list[float]:
    """Of that, one sample written alone (`write_sample`: infotext, PNG encoding, atomic rename)."""
    folder = workspace.scratch("png-writes")
    request = sample_requests("sdxl", dataclasses.replace(PROFILES["quick"], size_pixels=COST_PIXELS))[0]
    return [
        timed(lambda: write_sample(folder, 100, request, image, base_model="m", lora_name="l", arch="sdxl"))
        for _ in range(repeats)
    ]
