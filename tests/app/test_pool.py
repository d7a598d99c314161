"""Ray workers (`sidecar.app.pool`) under the coordinator: a local Ray on CPU, 2 workers, tiny models.

Ray starts once for the module (about 10 s, then each worker imports torch and diffusers),
and the workers' bases stay warm from one scenario to the next, so the scenarios share
one test: every sample once in each run's own folder with each base loaded once per
worker, then a worker SIGKILLed in the middle of a render. The scheduler's own rules
(turns, affinity, lost workers) are tested without Ray in test_coordinator.py.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from sidecar.app.coordinator import CoordinatorRequest, run_coordinator  # noqa: E402
from sidecar.app.pool import RayPool  # noqa: E402
from sidecar.app.worker import PoolOptions, load_base  # noqa: E402
from sidecar.jobs.store import JobStore  # noqa: E402
from sidecar.settings import SamplesFolder  # noqa: E402
from sidecar.testing.loras import write_lora  # noqa: E402
from sidecar.testing.trainer import write_trainer_config  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::RuntimeWarning", "ignore::UserWarning")]

FAST = {"settle_seconds": 0.1, "poll_interval_seconds": 0.05, "device": "cpu"}
OBJECT_STORE_BYTES = 100 * 1024 * 1024  # tiny LoRAs; Ray's default would take 30 % of the RAM
KILL_WAIT_SECONDS = 120.0  # a blocked render waits this long to be killed, then goes on


class KillableRenderer:
    """The worker's tiny renderer; once `armed` exists, the first render anywhere writes its
    process id to `blocked` and waits there to be killed."""

    def __init__(self, inner, markers: Path) -> None:
        self.inner, self.markers = inner, markers

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def render_resilient(self, requests, *, batch_size: int = 1):
        armed, blocked = self.markers / "armed", self.markers / "blocked"
        if armed.exists() and not blocked.exists():
            partial = self.markers / "blocked.partial"
            partial.write_text(str(os.getpid()))
            partial.replace(blocked)
            deadline = time.monotonic() + KILL_WAIT_SECONDS
            while time.monotonic() < deadline:
                time.sleep(0.05)
        yield from self.inner.render_resilient(requests, batch_size=batch_size)


def killable_factory(markers: Path):
    def factory(spec, device, gpu):
        return KillableRenderer(load_base(spec, device, gpu), markers)

    return factory


@pytest.fixture(scope="module")
def ray_pool(tmp_path_factory, quiet_diffusers):
    """Two CPU workers on a local Ray, shut down (Ray too) at the end of the module."""
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests/
    markers = tmp_path_factory.mktemp("markers")
    pool = RayPool.start(
        PoolOptions(ray="local", workers=2, device="cpu"),
        renderer_factory=killable_factory(markers),
        object_store_bytes=OBJECT_STORE_BYTES,
        num_cpus=2,
    )
    pool.markers = markers
    try:
        yield pool
    finally:
        pool.close()
        if ray.is_initialized():
            ray.shutdown()


def make_run(root: Path, name: str, model: Path, arch: str, steps: tuple[int, ...]) -> str:
    training = root / "training"
    (training / name).mkdir(parents=True, exist_ok=True)
    config = write_trainer_config(
        root / f"{name}.yaml",
        model_folder=model,
        training_folder=training,
        name=name,
        arch=arch,  # type: ignore[arg-type]
        prompts=("a photo of [trigger]", "[trigger] in the snow"),
        sample_steps=2,
        save_every=1,
    )
    for step in steps:
        path = training / name / f"{name}_{step:09d}.safetensors"
        write_lora(model, arch, path, lora_format="kohya", seed=step, scale=step / 100)
    return f"- output: {training / name}\n  config: {config}\n"


def rendered(root: Path, name: str) -> tuple[list[str], set[tuple[str, int]]]:
    """The run's images, and the (state, attempts) of its sample rows: ("done", 1) is once."""
    folder = SamplesFolder(root / "training" / name / "samples")
    images = sorted(str(path.relative_to(folder.root)) for path in folder.root.glob("step_*/sample_*.png"))
    with JobStore(folder.jobs) as store:
        rows = {(s.state, s.attempts) for job in store.checkpoints() for s in store.samples(job.id)}
    return images, rows


EXPECTED = [f"step_000{step}/sample_0{index}.png" for step in (100, 200, 300) for index in (0, 1)]


def test_ray_workers_render_each_sample_once_keep_bases_warm_and_outlive_a_killed_worker(
    ray_pool, tiny_models, tmp_path: Path
) -> None:
    # 2 runs x 3 checkpoints, on two architectures
    runs_file = tmp_path / "runs.yaml"
    runs_file.write_text(
        make_run(tmp_path, "a", tiny_models["sdxl"], "sdxl", (100, 200, 300))
        + make_run(tmp_path, "b", tiny_models["sd3"], "sd3", (100, 200, 300))
    )

    assert run_coordinator(CoordinatorRequest(runs_file, FAST, once=True), pool=ray_pool) == 0

    for name in ("a", "b"):
        assert rendered(tmp_path, name) == (EXPECTED, {("done", 1)})
    loads = [info["loads"] for info in ray_pool.info()]
    for worker in loads:  # affinity: once per worker and base, never once per checkpoint
        assert max(Counter(worker).values(), default=0) == 1
    assert 2 <= sum(map(len, loads)) <= 4

    # a worker's process SIGKILLed in the middle of a render
    (ray_pool.markers / "armed").touch()
    runs_file.write_text(make_run(tmp_path, "c", tiny_models["sdxl"], "sdxl", (100, 200, 300)))
    killed: list[int] = []

    def kill_when_blocked() -> None:
        blocked = ray_pool.markers / "blocked"
        deadline = time.monotonic() + KILL_WAIT_SECONDS
        while not blocked.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        killed.append(int(blocked.read_text()))
        os.kill(killed[0], signal.SIGKILL)

    killer = threading.Thread(target=kill_when_blocked, daemon=True)
    killer.start()
    started = time.monotonic()

    assert run_coordinator(CoordinatorRequest(runs_file, FAST, once=True), pool=ray_pool) == 0

    killer.join(1)
    assert killed and time.monotonic() - started < KILL_WAIT_SECONDS  # killed, not waited out
    assert rendered(tmp_path, "c") == (EXPECTED, {("done", 1)})
    pids = {info["pid"] for info in workers_once_back(ray_pool)}  # Ray restarted the killed worker
    assert len(pids) == 2 and killed[0] not in pids


def workers_once_back(pool: RayPool) -> list[dict]:
    """Each worker's info, once every worker answers (a restarting actor refuses calls)."""
    deadline = time.monotonic() + KILL_WAIT_SECONDS
    while True:
        try:
            return pool.info()
        except ray.exceptions.ActorUnavailableError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
