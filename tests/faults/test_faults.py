"""The fault matrix: what the daemon survives, end to end.

Each test runs the real daemon (`run_watch`, or a subprocess of it where the process must
die) with the real watchdog observer on a temp folder, beside a simulated trainer writing
real tiny-SDXL LoRA files, and renders with the tiny SDXL model at 64x64 in 2 steps (the
50-checkpoint burst at 32x32 in 1 step). Test names say what each case survives.
"""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from faults.beside import run_beside

from sidecar.app.commands import status as status_command
from sidecar.app.watch import WatchRequest, run_watch
from sidecar.jobs.store import JobStore
from sidecar.settings import STATE_FILE_NAME, SamplesFolder
from sidecar.testing.loras import write_lora
from sidecar.testing.tiny import save_tiny_model
from sidecar.testing.trainer import TRAINER_LAYOUTS, SimulatedTrainer, write_trainer_config

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning", "ignore::UserWarning")

NAME = "demo_lora"
PROMPTS = ("a photo of [trigger]", "[trigger] in the snow")
SETTLE_SECONDS = 0.3
SUBPROCESS_START_SECONDS = 120.0  # a fresh interpreter imports torch and diffusers first


@pytest.fixture(scope="module")
def renderer(tiny_sdxl: Path):
    """One renderer for the module, as the daemon holds one per process."""
    from sidecar.render.registry import renderer_class

    return renderer_class("sdxl").from_model(str(tiny_sdxl))


class Run:
    """A trainer output folder, its config and the daemon's samples folder."""

    def __init__(
        self, tmp_path: Path, model: Path, *, prompts=PROMPTS, size_pixels: int = 64, steps: int = 2
    ) -> None:
        self.model = model
        self.output_dir = tmp_path / "output" / NAME
        self.output_dir.mkdir(parents=True)
        self.samples_dir = self.output_dir / "samples"
        self.prompts = prompts
        self.config_path = write_trainer_config(
            tmp_path / "trainer.yaml",
            model_folder=model,
            training_folder=tmp_path / "output",
            prompts=prompts,
            size_pixels=size_pixels,
            sample_steps=steps,
            save_every=1,
        )

    @property
    def folder(self) -> SamplesFolder:
        return SamplesFolder(self.samples_dir)

    @property
    def db(self) -> Path:
        return self.folder.jobs

    def request(self, *, once: bool = False, **changes) -> WatchRequest:
        """A `sidecar watch` of this run; `changes` override its settings."""
        settings = {
            "device": "cpu",
            "settle_seconds": SETTLE_SECONDS,
            "abandon_seconds": 3.0,
            "poll_interval_seconds": 0.05,
        }
        return WatchRequest(
            output_dir=self.output_dir, config_path=self.config_path, overrides=settings | changes, once=once
        )

    def beside(self, trainer: Callable[[], None], renderer, **changes) -> int:
        """Run the daemon in this thread while `trainer` runs in another; the daemon's exit code."""
        return run_beside(self.request(**changes), trainer, renderer)[0]

    def jobs(self) -> dict[int | None, object]:
        with JobStore(self.db) as store:
            return {job.step: job for job in store.checkpoints()}

    def all_samples(self) -> list:
        with JobStore(self.db) as store:
            return [sample for job in store.checkpoints() for sample in store.samples(job.id)]

    def images(self, step: int) -> list[Path]:
        return sorted((self.samples_dir / f"step_{step:06d}").glob("sample_*.png"))

    def temp_files(self) -> list[Path]:
        return [p for p in self.samples_dir.rglob("*") if p.name.endswith((".tmp", ".partial"))]

    def cached_copies(self) -> list[Path]:
        return list(self.folder.cache.iterdir())

    def lora_bytes(self, step: int, *, arch_model: Path | None = None, arch: str = "sdxl") -> bytes:
        with tempfile.TemporaryDirectory() as folder:
            path = write_lora(
                arch_model or self.model,
                arch,  # type: ignore[arg-type]
                Path(folder) / "lora.safetensors",
                lora_format="kohya" if arch == "sdxl" else "peft",
                seed=step,
                scale=0.5 + step / 10_000,
            )
            return path.read_bytes()


def wait_until(condition: Callable[[], bool], *, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.01)
    raise AssertionError(f"timed out after {seconds} s waiting for {what}")


def recorded(db: Path, path: Path) -> bool:
    """Whether the daemon's store has a row for `path` (read with plain sqlite, as another process)."""
    if not db.is_file():
        return False
    try:
        with sqlite3.connect(db, timeout=5) as connection:
            return (
                connection.execute("SELECT 1 FROM checkpoints WHERE path = ?", (str(path),)).fetchone()
                is not None
            )
    except sqlite3.OperationalError:  # the schema is being created
        return False


# --- every trainer layout, written slowly in place -----------------------------------------


@pytest.mark.parametrize("layout", TRAINER_LAYOUTS)
def test_slow_in_place_writes_are_never_read_half_written(
    tmp_path: Path, tiny_sdxl: Path, renderer, layout: str
) -> None:
    run = Run(tmp_path, tiny_sdxl)
    trainer = SimulatedTrainer(
        model_folder=tiny_sdxl,
        output_dir=run.output_dir,
        layout=layout,  # type: ignore[arg-type]
        steps=(100, 200),
        final_step=300,
        chunks=5,
        chunk_pause_seconds=0.1,  # a reader sees every file half written several times
        save_pause_seconds=0.2,
    )

    code = run.beside(trainer.run, renderer)

    assert code == 0 and trainer.error is None
    jobs = run.jobs()
    assert {step: job.state for step, job in jobs.items()} == {100: "done", 200: "done", 300: "done"}
    assert {w.step: w.content_hash for w in trainer.written} == {s: j.content_hash for s, j in jobs.items()}
    assert jobs[300].is_final
    for step in (100, 200, 300):
        assert len(run.images(step)) == len(PROMPTS)
    assert run.temp_files() == [] and run.cached_copies() == []


# --- kill -9 and SIGTERM -------------------------------------------------------------------

DAEMON_SCRIPT = textwrap.dedent(
    """
    import logging, sys
    from pathlib import Path
    from sidecar.app.watch import WatchRequest, run_watch

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    request = WatchRequest(
        output_dir=Path(sys.argv[1]), config_path=Path(sys.argv[2]),
        overrides={"device": "cpu", "settle_seconds": 0.2, "poll_interval_seconds": 0.05},
    )
    sys.exit(run_watch(request))
    """
)


def start_daemon_process(run: Run, log: Path) -> subprocess.Popen:
    environment = os.environ | {"HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-c", DAEMON_SCRIPT, str(run.output_dir), str(run.config_path)],
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        env=environment,
    )


def wait_for_first_image(process: subprocess.Popen, run: Run, log: Path) -> None:
    """Until the store has marked a first sample done (its file has landed just before)."""

    def started() -> bool:
        assert process.poll() is None, f"the daemon exited early:\n{log.read_text()}"
        if not run.db.is_file():
            return False
        try:
            with sqlite3.connect(run.db, timeout=5) as connection:
                row = connection.execute("SELECT COUNT(*) FROM samples WHERE state = 'done'").fetchone()
        except sqlite3.OperationalError:  # the schema is being created
            return False
        return row[0] > 0

    wait_until(started, seconds=SUBPROCESS_START_SECONDS, what="the first image")


def done_sample_files(db: Path) -> dict[str, int]:
    """`{output_path: mtime_ns}` of every sample the store has marked done."""
    with sqlite3.connect(db, timeout=5) as connection:
        rows = connection.execute("SELECT output_path FROM samples WHERE state = 'done'").fetchall()
    return {path: Path(path).stat().st_mtime_ns for (path,) in rows}


@pytest.mark.slow
def test_kill_9_mid_render_then_restart_renders_every_sample_exactly_once(
    tmp_path: Path, tiny_sdxl: Path, renderer
) -> None:
    prompts = tuple(f"[trigger] picture {n}" for n in range(6))
    run = Run(tmp_path, tiny_sdxl, prompts=prompts)
    for step in (100, 200):
        (run.output_dir / f"{NAME}_{step:09d}.safetensors").write_bytes(run.lora_bytes(step))
    log = tmp_path / "daemon.log"
    process = start_daemon_process(run, log)
    try:
        wait_for_first_image(process, run, log)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    before = done_sample_files(run.db)
    assert 1 <= len(before) < 2 * len(prompts), "the kill must land mid-render"

    code = run_watch(run.request(once=True), renderer_factory=lambda: renderer)

    assert code == 0
    samples = run.all_samples()
    assert len(samples) == 2 * len(prompts)  # no duplicate rows
    assert {s.state for s in samples} == {"done"}
    for step in (100, 200):
        folder = run.samples_dir / f"step_{step:06d}"
        assert sorted(p.name for p in folder.iterdir()) == sorted(
            [f"sample_{i:02d}.png" for i in range(len(prompts))]
            + [f"sample_{i:02d}.txt" for i in range(len(prompts))]
            + ["grid.png"]  # the step's contact sheet, once all its samples are on disk
        )
    # a sample marked done before the kill was not rendered again
    assert {path: Path(path).stat().st_mtime_ns for path in before} == before
    assert {job.state for job in run.jobs().values()} == {"done"}
    assert run.jobs()[100].interruptions == 1
    assert run.temp_files() == [] and run.cached_copies() == []


@pytest.mark.slow
def test_sigterm_stops_after_the_current_image_with_the_store_consistent(
    tmp_path: Path, tiny_sdxl: Path
) -> None:
    prompts = tuple(f"[trigger] picture {n}" for n in range(12))
    run = Run(tmp_path, tiny_sdxl, prompts=prompts)
    (run.output_dir / f"{NAME}_000000100.safetensors").write_bytes(run.lora_bytes(100))
    log = tmp_path / "daemon.log"
    process = start_daemon_process(run, log)
    try:
        wait_for_first_image(process, run, log)
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()

    assert code == 0, log.read_text()
    samples = run.all_samples()
    done = [s for s in samples if s.state == "done"]
    assert {s.state for s in samples} <= {"done", "pending"}  # nothing left `running`
    assert 1 <= len(done) < len(prompts)
    assert sorted(s.output_path for s in done) == run.images(100)  # the store matches the files
    assert run.jobs()[100].state == "pending"
    assert run.temp_files() == []
    assert len(run.cached_copies()) == 1  # kept for the rest
    assert "stop requested" in log.read_text()
    assert "not running (last state: stopped" in status_command(run.output_dir, output=None)


# --- pruning, bursts --------------------------------------------------------------------------


def test_pruned_checkpoints_are_still_rendered_or_recorded_vanished_once(
    tmp_path: Path, tiny_sdxl: Path, renderer
) -> None:
    run = Run(tmp_path, tiny_sdxl)
    writer = SimulatedTrainer(model_folder=tiny_sdxl, output_dir=run.output_dir, chunk_pause_seconds=0.02)
    paths = {step: writer.checkpoint_path(step) for step in (100, 200, 300)}

    def trainer() -> None:
        writer.write_in_place(paths[100], run.lora_bytes(100))
        wait_until(lambda: recorded(run.db, paths[100]), seconds=60, what="step 100 to be recorded")
        paths[100].unlink()  # pruned once sidecar has it
        writer.write_in_place(paths[200], run.lora_bytes(200))
        paths[200].unlink()  # pruned the moment it is whole: sidecar never gets it
        writer.write_in_place(paths[300], run.lora_bytes(300))

    run.beside(trainer, renderer, settle_seconds=0.5)

    jobs = run.jobs()
    assert jobs[100].state == "done" and len(run.images(100)) == len(PROMPTS)
    assert jobs[200].state == "failed" and jobs[200].error.startswith("vanished")
    assert jobs[300].state == "done"
    run_watch(run.request(once=True), renderer_factory=lambda: renderer)  # a restart
    assert len(run.jobs()) == 3


def write_burst(run: Run, steps: list[int]) -> None:
    payloads = {step: run.lora_bytes(step) for step in steps}
    for step in steps:
        (run.output_dir / f"{NAME}_{step:09d}.safetensors").write_bytes(payloads[step])


@pytest.mark.slow
def test_a_burst_of_50_checkpoints_with_backlog_all_renders_each_once(
    tmp_path: Path, tiny_sdxl: Path, renderer
) -> None:
    run = Run(tmp_path, tiny_sdxl, prompts=("[trigger]",), size_pixels=32, steps=1)
    steps = [100 * n for n in range(1, 51)]

    run.beside(lambda: write_burst(run, steps), renderer, backlog="all")

    jobs = run.jobs()
    assert sorted(jobs) == steps
    assert {job.state for job in jobs.values()} == {"done"}
    assert all(len(run.images(step)) == 1 for step in steps)
    assert len(run.all_samples()) == 50


def test_a_burst_of_50_checkpoints_with_backlog_latest_skips_to_the_newest(
    tmp_path: Path, tiny_sdxl: Path, renderer
) -> None:
    run = Run(tmp_path, tiny_sdxl, prompts=("[trigger]",), size_pixels=32, steps=1)
    steps = [100 * n for n in range(1, 51)]

    run.beside(lambda: write_burst(run, steps), renderer, backlog="latest")

    jobs = run.jobs()
    assert sorted(jobs) == steps
    states = [job.state for job in jobs.values()]
    assert set(states) <= {"done", "skipped"}
    assert jobs[5000].state == "done"
    assert states.count("done") < 25  # most of the burst was skipped, not rendered
    rendered = sorted(int(p.name.removeprefix("step_")) for p in run.samples_dir.glob("step_*"))
    assert rendered == sorted(step for step, job in jobs.items() if job.state == "done")


# --- bad files among good ones ------------------------------------------------------------------


def test_corrupt_truncated_empty_pickle_and_wrong_architecture_files_fail_with_reasons_while_good_ones_render(
    tmp_path: Path, tiny_sdxl: Path, renderer
) -> None:
    run = Run(tmp_path, tiny_sdxl)
    sd3 = save_tiny_model("sd3", tmp_path / "tiny-sd3")
    good = run.lora_bytes(300)

    def name(step: int, suffix: str = ".safetensors") -> Path:
        return run.output_dir / f"{NAME}_{step:09d}{suffix}"

    def trainer() -> None:
        name(100).write_bytes(run.lora_bytes(100))
        name(200).write_bytes(random.Random(0).randbytes(5000))  # corrupt
        name(300).write_bytes(good[: len(good) // 2])  # truncated, never finished
        name(400).write_bytes(b"")  # zero bytes
        name(500).write_bytes(run.lora_bytes(500, arch_model=sd3, arch="sd3"))  # another architecture
        name(600, ".ckpt").write_bytes(b"\x80\x04pickle")  # never unpickled
        name(700).write_bytes(run.lora_bytes(700))

    code = run.beside(trainer, renderer, abandon_seconds=2.0)

    jobs = run.jobs()
    assert {step: job.state for step, job in jobs.items()} == {
        100: "done",
        200: "failed",
        300: "failed",
        400: "failed",
        500: "failed",
        600: "failed",
        700: "done",
    }
    assert "not a safetensors file, or corrupt" in jobs[200].error
    assert "truncated for good" in jobs[300].error and "file has" in jobs[300].error
    assert "file is empty" in jobs[400].error
    assert "Stable Diffusion XL" in jobs[500].error
    assert "pickle" in jobs[600].error
    assert len(run.images(100)) == len(run.images(700)) == len(PROMPTS)
    assert code == 0  # a watching daemon does not exit non-zero for one bad checkpoint
    report = status_command(run.output_dir, output=None)
    assert "failures (5):" in report
    assert STATE_FILE_NAME in {p.name for p in run.folder.state.iterdir()}
