"""The daemon's worker, driven one `loop_once(now)` at a time with fake time and the tiny SDXL model."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from sidecar.daemon import DaemonSettings, Worker, _daemon_lock

from sidecar.app.status import status_report
from sidecar.app.watch import run_watch as run_daemon
from sidecar.errors import ModelError, SidecarError, TransientError
from sidecar.intake.cache import content_hash
from sidecar.intake.watcher import FileEvent, scan_tree
from sidecar.jobs.store import JobStore
from sidecar.plan.build import build_plan
from sidecar.plan.config import load_trainer_config
from sidecar.settings import JOBS_FILE_NAME, STATE_FILE_NAME
from sidecar.settings import SamplesFolder as state_dir
from sidecar.testing.loras import write_lora
from sidecar.testing.tiny import save_tiny_model
from sidecar.testing.trainer import write_trainer_config

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning", "ignore::UserWarning")

SETTLE_SECONDS = 1.0
ABANDON_SECONDS = 5.0
PROMPTS = ("a photo of [trigger]", "[trigger] in the snow")
NAME = "demo_lora"


@pytest.fixture(scope="module")
def base_renderer(tiny_sdxl: Path):
    """One tiny SDXL renderer for the module, as the daemon holds one per process."""
    from sidecar.render.registry import renderer_class

    return renderer_class("sdxl").from_model(str(tiny_sdxl))


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class CountingRenderer:
    """The real renderer, counting LoRAs applied and images rendered; can fail or stop on cue."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.applied: list[Path] = []
        self.rendered: list[int] = []
        self.fail_apply: list[Exception] = []
        self.before_image: Callable[[], None] | None = None

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def apply_lora(self, path):
        self.applied.append(Path(path))
        if self.fail_apply:
            raise self.fail_apply.pop(0)
        return self.inner.apply_lora(path)

    def render(self, requests, *, batch_size: int = 1) -> Iterator:
        for request, image in self.inner.render(requests, batch_size=batch_size):
            self.rendered.append(request.index)
            if self.before_image is not None:
                self.before_image()
            yield request, image


class SlotSwitch:
    """A slot gate the test opens and closes."""

    def __init__(self, *, is_open: bool = True) -> None:
        self.is_open = is_open
        self.reason = "the trainer holds the GPU"
        self.taken_at_hold = 0  # how many holds fail as if the trainer took the slot first

    def wait_state(self, now: float, *, in_checkpoint: bool = False) -> SlotSwitch:
        return self

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        if self.taken_at_hold:
            self.taken_at_hold -= 1
            raise TransientError("the slot closed before the render started")
        yield


@dataclass
class Rig:
    """A worker on a temp output folder, with the pieces a test pokes at."""

    tmp_path: Path
    model: Path
    output_dir: Path
    samples_dir: Path
    config_path: Path
    settings: DaemonSettings
    renderer: CountingRenderer
    clock: FakeClock
    gate: SlotSwitch
    store: JobStore | None = None
    worker: Worker | None = None

    def start(self, *, backlog: str = "all") -> Worker:
        """(Re)start the worker on the same samples folder, as a new process would."""
        if self.store is not None:
            self.store.close()
        config = load_trainer_config(self.config_path)
        self.store = JobStore(state_dir(self.samples_dir) / JOBS_FILE_NAME, now=self.clock.now)
        self.worker = Worker(
            settings=self.settings,
            config=config,
            plan=build_plan(config),
            store=self.store,
            events=queue.Queue(),
            samples_dir=self.samples_dir,
            backlog=backlog,  # type: ignore[arg-type]
            renderer_factory=lambda config: self.renderer,
            slot_gate=self.gate,
            clock=self.clock,
        )
        return self.worker

    def lora(self, name: str, *, step: int = 100, metadata: dict[str, str] | None = None) -> Path:
        path = self.output_dir / name
        write_lora(
            self.model, "sdxl", path, lora_format="kohya", seed=step, scale=step / 100, metadata=metadata
        )
        return path

    def scan(self) -> None:
        assert self.worker is not None
        for event in scan_tree(self.output_dir, root=self.output_dir):
            self.worker.events.put(event)

    def event(self, kind: str, path: Path) -> None:
        from sidecar.intake.layouts import recognise

        assert self.worker is not None
        self.worker.events.put(FileEvent(kind, path, recognise(path, root=self.output_dir)))  # type: ignore[arg-type]

    def run(self, *times: float) -> list[bool]:
        assert self.worker is not None
        did = []
        for now in times:
            self.clock.now = now
            did.append(self.worker.loop_once(now))
        return did

    def jobs(self) -> dict[int | None, object]:
        assert self.store is not None
        return {job.step: job for job in self.store.checkpoints()}

    def images(self, step: int) -> list[Path]:
        return sorted((self.samples_dir / f"step_{step:06d}").glob("sample_*.png"))


@pytest.fixture
def make_rig(tmp_path: Path, tiny_sdxl: Path, base_renderer) -> Iterator[Callable[..., Rig]]:
    rigs: list[Rig] = []

    def make(*, prompts: Sequence[str] = PROMPTS) -> Rig:
        training_folder = tmp_path / "output"
        output_dir = training_folder / NAME
        output_dir.mkdir(parents=True, exist_ok=True)
        config_path = write_trainer_config(
            tmp_path / "trainer.yaml",
            model_folder=tiny_sdxl,
            training_folder=training_folder,
            prompts=prompts,
            sample_steps=2,
            save_every=1,
        )
        settings = DaemonSettings(
            output_dir=output_dir,
            config_path=config_path,
            settle_seconds=SETTLE_SECONDS,
            abandon_seconds=ABANDON_SECONDS,
        )
        rig = Rig(
            tmp_path=tmp_path,
            model=tiny_sdxl,
            output_dir=output_dir,
            samples_dir=output_dir / "samples",
            config_path=config_path,
            settings=settings,
            renderer=CountingRenderer(base_renderer),
            clock=FakeClock(),
            gate=SlotSwitch(),
        )
        rig.start()
        rigs.append(rig)
        return rig

    yield make
    for rig in rigs:
        if rig.store is not None:
            rig.store.close()


def test_a_checkpoint_is_rendered_once_after_it_settles(make_rig) -> None:
    rig = make_rig()
    lora = rig.lora(f"{NAME}_000000100.safetensors")
    rig.scan()

    assert rig.run(0.0) == [True]  # the scan's event, tracked
    rig.run(0.5)
    assert rig.jobs() == {}  # whole, but not settled yet

    rig.run(1.5)

    job = rig.jobs()[100]
    assert job.state == "done" and job.content_hash == content_hash(lora)
    assert [p.name for p in rig.images(100)] == ["sample_00.png", "sample_01.png"]
    assert rig.renderer.rendered == [0, 1]
    # the same file seen again (a late event, the next startup scan): nothing new
    rig.event("modified", lora)
    rig.scan()
    rig.run(3.0, 5.0)
    assert rig.renderer.rendered == [0, 1]
    assert not any((state_dir(rig.samples_dir) / "cache").iterdir())  # the copy is dropped when done


def test_a_half_written_checkpoint_is_read_only_once_whole(make_rig) -> None:
    rig = make_rig()
    path = rig.output_dir / f"{NAME}_000000100.safetensors"
    data = rig.lora("staging_lora.safetensors").read_bytes()
    (rig.output_dir / "staging_lora.safetensors").unlink()
    path.write_bytes(data[: len(data) // 2])
    rig.event("created", path)

    rig.run(0.0, 2.0, 4.0)
    assert rig.jobs() == {} and rig.renderer.applied == []

    path.write_bytes(data)
    rig.event("modified", path)
    rig.run(4.5, 6.0)

    assert rig.jobs()[100].state == "done"
    assert rig.jobs()[100].content_hash == content_hash(path)


def test_a_checkpoint_truncated_for_good_is_recorded_failed_once(make_rig) -> None:
    rig = make_rig()
    path = rig.lora(f"{NAME}_000000100.safetensors")
    path.write_bytes(path.read_bytes()[:1000])
    rig.scan()

    rig.run(0.0, ABANDON_SECONDS + 1)

    (job,) = rig.jobs().values()
    assert job.state == "failed" and "truncated for good" in job.error
    rig.start()  # a restart sees the same file again
    rig.scan()
    rig.run(10.0, 20.0)
    assert len(rig.jobs()) == 1


def test_a_checkpoint_pruned_after_it_was_whole_is_still_rendered(make_rig) -> None:
    rig = make_rig()
    rig.gate.is_open = False  # ingest happens, rendering waits
    path = rig.lora(f"{NAME}_000000100.safetensors")
    rig.scan()
    rig.run(0.0, 1.5)
    assert rig.jobs()[100].state == "pending"
    state = json.loads((state_dir(rig.samples_dir) / STATE_FILE_NAME).read_text())
    assert state["state"] == "waiting for a slot: the trainer holds the GPU"

    path.unlink()  # max_step_saves_to_keep
    rig.event("deleted", path)
    rig.gate.is_open = True
    rig.run(2.0)

    assert rig.jobs()[100].state == "done"
    assert len(rig.images(100)) == 2
    assert rig.renderer.applied[0].parent.parent.name == "cache"


def test_a_checkpoint_written_during_a_render_is_copied_between_two_images(make_rig) -> None:
    rig = make_rig(prompts=("one [trigger]", "two [trigger]", "three [trigger]"))
    rig.lora(f"{NAME}_000000100.safetensors", step=100)
    rig.scan()
    later = rig.output_dir / f"{NAME}_000000200.safetensors"
    images = iter(range(3))

    def trainer_meanwhile() -> None:
        number = next(images)
        if number == 0:
            rig.lora(later.name, step=200)
            rig.event("created", later)
        elif number == 1:
            rig.clock.now += SETTLE_SECONDS + 1  # a long image
        else:
            later.unlink()  # pruned before the render of step 100 is over

    rig.renderer.before_image = trainer_meanwhile
    rig.run(0.0, 1.5)
    rig.renderer.before_image = None
    assert rig.jobs()[200].state == "pending"

    rig.run(rig.clock.now + 1)

    assert rig.jobs()[200].state == "done" and len(rig.images(200)) == 3


def test_a_slot_taken_at_the_last_moment_leaves_the_checkpoint_waiting(make_rig) -> None:
    rig = make_rig()
    rig.gate.taken_at_hold = 1
    rig.lora(f"{NAME}_000000100.safetensors")
    rig.scan()

    rig.run(0.0, 1.5)
    job = rig.jobs()[100]
    assert job.state == "pending" and rig.renderer.applied == []
    assert all(s.state == "pending" for s in rig.store.samples(job.id))

    rig.run(2.0)
    assert rig.jobs()[100].state == "done"


def test_a_checkpoint_deleted_before_it_settled_is_recorded_vanished_once(make_rig) -> None:
    rig = make_rig()
    path = rig.lora(f"{NAME}_000000100.safetensors")
    rig.event("created", path)
    rig.run(0.0)
    path.unlink()
    rig.event("deleted", path)
    rig.run(0.5)
    rig.event("created", path)  # an event that arrives late
    rig.run(1.0, 3.0)

    (job,) = rig.jobs().values()
    assert job.state == "failed" and job.error.startswith("vanished")
    assert rig.renderer.applied == []


def test_restart_renders_only_the_missing_samples(make_rig) -> None:
    rig = make_rig(prompts=("one [trigger]", "two [trigger]", "three [trigger]"))
    path = rig.lora(f"{NAME}_000000100.safetensors")
    rig.scan()
    rig.renderer.before_image = rig.worker.request_stop  # a SIGTERM during the first image
    rig.run(0.0, 1.5)
    assert rig.worker.stop_requested
    assert rig.jobs()[100].state == "pending"
    assert [s.state for s in rig.store.samples(rig.jobs()[100].id)] == ["done", "pending", "pending"]
    (first,) = rig.images(100)
    first_mtime = first.stat().st_mtime_ns
    path.unlink()  # pruned while sidecar was down: the cached copy is rendered

    rig.renderer.before_image = None
    rig.renderer.rendered.clear()
    rig.start()
    rig.scan()
    rig.run(2.0)

    assert rig.renderer.rendered == [1, 2]
    assert rig.jobs()[100].state == "done"
    assert len(rig.images(100)) == 3
    assert first.stat().st_mtime_ns == first_mtime


def test_a_final_checkpoint_without_a_step_goes_one_past_the_highest(make_rig) -> None:
    rig = make_rig()
    rig.lora(f"{NAME}_000000100.safetensors", step=100)
    rig.lora(f"{NAME}_000000200.safetensors", step=200)
    rig.lora(f"{NAME}.safetensors", step=250)  # no step in the name, none in the metadata
    rig.scan()

    rig.run(0.0, 1.5, 2.0, 2.5)  # one checkpoint per iteration

    jobs = rig.jobs()
    assert sorted(jobs) == [100, 200, 201]
    assert jobs[201].is_final and jobs[201].state == "done"
    assert len(rig.images(201)) == 2


def test_a_checkpoint_without_a_step_in_its_name_takes_it_from_metadata(make_rig) -> None:
    rig = make_rig()
    rig.lora("kohya_style.safetensors", step=3, metadata={"ss_steps": "750"})
    rig.lora(f"{NAME}.safetensors", step=4)  # no metadata: placed after the one that has it
    rig.scan()

    rig.run(0.0, 1.5, 2.0)

    assert sorted(rig.jobs()) == [750, 751]


def test_a_final_checkpoint_with_no_step_and_no_history_is_step_one(make_rig) -> None:
    rig = make_rig()
    rig.lora(f"{NAME}.safetensors")
    rig.scan()

    rig.run(0.0, 1.5)

    assert sorted(rig.jobs()) == [1]  # step 0 is the baseline render of the base model


def test_a_lora_of_another_architecture_fails_with_its_reason_and_the_next_renders(
    make_rig, tmp_path_factory: pytest.TempPathFactory
) -> None:
    rig = make_rig()
    sd3 = save_tiny_model("sd3", tmp_path_factory.mktemp("models") / "tiny-sd3")
    write_lora(sd3, "sd3", rig.output_dir / f"{NAME}_000000100.safetensors", lora_format="peft")
    rig.lora(f"{NAME}_000000200.safetensors", step=200)
    rig.scan()

    rig.run(0.0, 1.5, 2.0)

    jobs = rig.jobs()
    assert jobs[100].state == "failed" and "Stable Diffusion XL" in jobs[100].error
    assert jobs[200].state == "done"
    assert rig.images(100) == []


def test_a_transient_error_is_retried_after_a_backoff(make_rig) -> None:
    rig = make_rig()
    rig.renderer.fail_apply.append(TransientError("file busy"))
    rig.lora(f"{NAME}_000000100.safetensors")
    rig.scan()

    rig.run(0.0, 1.5)
    job = rig.jobs()[100]
    assert job.state == "pending" and "file busy" in job.error and job.retry_at > 1.5
    rig.run(5.0)
    assert rig.jobs()[100].state == "pending"  # backoff not over

    rig.run(job.retry_at + 0.1)
    assert rig.jobs()[100].state == "done"


def test_cuda_out_of_memory_with_no_stronger_mode_is_retried_later(make_rig) -> None:
    import torch

    rig = make_rig()
    rig.renderer.fail_apply.append(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"))
    rig.lora(f"{NAME}_000000100.safetensors")
    rig.scan()
    rig.run(0.0, 1.5)
    job = rig.jobs()[100]
    assert job.state == "pending" and "out of memory: CUDA out of memory" in job.error
    rig.run(job.retry_at + 0.1)
    assert rig.jobs()[100].state == "done"


def test_an_unexpected_error_fails_that_checkpoint_and_the_worker_goes_on(make_rig, caplog) -> None:
    rig = make_rig()
    rig.renderer.fail_apply.append(RuntimeError("boom"))
    rig.lora(f"{NAME}_000000100.safetensors", step=100)
    rig.lora(f"{NAME}_000000200.safetensors", step=200)
    rig.scan()

    with caplog.at_level(logging.ERROR, logger="sidecar.daemon"):
        rig.run(0.0, 1.5, 2.0)

    jobs = rig.jobs()
    assert jobs[100].state == "failed" and "RuntimeError: boom" in jobs[100].error
    assert jobs[200].state == "done"
    assert any(record.exc_info for record in caplog.records)


def test_a_changed_sample_section_applies_to_later_checkpoints(make_rig, caplog) -> None:
    rig = make_rig()
    rig.lora(f"{NAME}_000000100.safetensors", step=100)
    rig.scan()
    rig.run(0.0, 1.5)
    assert len(rig.images(100)) == 2

    write_trainer_config(
        rig.config_path,
        model_folder=rig.model,
        training_folder=rig.output_dir.parent,
        prompts=(*PROMPTS, "three"),
        sample_steps=2,
        save_every=1,
    )
    later = time.time() + 10
    os.utime(rig.config_path, (later, later))
    rig.lora(f"{NAME}_000000200.safetensors", step=200)
    rig.scan()
    rig.run(2.0, 3.5)
    assert len(rig.images(200)) == 3
    assert len(rig.images(100)) == 2

    rig.config_path.write_text(rig.config_path.read_text().replace("sample_steps: 2", "sample_steps: twenty"))
    os.utime(rig.config_path, (later + 10, later + 10))
    rig.lora(f"{NAME}_000000300.safetensors", step=300)
    rig.scan()
    with caplog.at_level(logging.ERROR, logger="sidecar.daemon"):
        rig.run(4.0, 5.5)
    assert len(rig.images(300)) == 3  # the previous plan is kept
    (error,) = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert "sample_steps" in error.getMessage() and "trainer.yaml:" in error.getMessage()


def test_backlog_latest_renders_the_newest_and_skips_older(make_rig) -> None:
    rig = make_rig()
    for step in (100, 200, 300):
        rig.lora(f"{NAME}_{step:09d}.safetensors", step=step)
    rig.start(backlog="latest")
    rig.scan()

    rig.run(0.0, 1.5, 2.0)

    states = {step: job.state for step, job in rig.jobs().items()}
    assert states == {100: "skipped", 200: "skipped", 300: "done"}


def test_status_report_shows_queue_last_step_and_failures(make_rig) -> None:
    rig = make_rig()
    rig.lora(f"{NAME}_000000100.safetensors", step=100)
    (rig.output_dir / f"{NAME}_000000200.safetensors").write_bytes(b"")
    rig.scan()
    rig.run(0.0, 1.5, ABANDON_SECONDS + 1)
    rig.gate.is_open = False
    rig.lora(f"{NAME}_000000300.safetensors", step=300)
    rig.scan()
    rig.run(10.0, 12.0)

    report = status_report(rig.output_dir)  # an output folder finds its samples/

    assert f"samples folder: {rig.samples_dir}" in report
    assert "waiting for a slot: the trainer holds the GPU" in report
    assert "last rendered: step 100" in report
    assert "queue (1):" in report and "step 300" in report
    assert "failures (1):" in report and "file is empty" in report
    assert status_report(rig.samples_dir) == report


def test_status_report_without_a_store_says_where_it_looked(tmp_path: Path) -> None:
    with pytest.raises(SidecarError, match="no sidecar job store"):
        status_report(tmp_path)


def test_run_daemon_once_renders_what_is_there_and_exits(make_rig) -> None:
    rig = make_rig()
    rig.store.close()
    rig.store = None
    rig.lora(f"{NAME}_000000100.safetensors", step=100)
    settings = DaemonSettings(
        output_dir=rig.output_dir,
        config_path=rig.config_path,
        settle_seconds=0.1,
        poll_interval_seconds=0.05,
        once=True,
    )

    code = run_daemon(settings, renderer_factory=lambda config: rig.renderer)

    assert code == 0
    assert len(rig.images(100)) == 2
    assert "daemon: not running (last state: stopped" in status_report(rig.output_dir)


def test_one_daemon_per_samples_folder(make_rig) -> None:
    rig = make_rig()
    settings = DaemonSettings(output_dir=rig.output_dir, config_path=rig.config_path, once=True)
    with _daemon_lock(state_dir(rig.samples_dir)), pytest.raises(SidecarError, match="already rendering"):
        run_daemon(settings, renderer_factory=lambda config: rig.renderer)


def test_daemon_settings_reject_nonsense(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="abandon_seconds"):
        DaemonSettings(
            output_dir=tmp_path, config_path=tmp_path / "x.yaml", settle_seconds=5, abandon_seconds=1
        )
    with pytest.raises(ValueError, match="stop_after"):
        DaemonSettings(output_dir=tmp_path, config_path=tmp_path / "x.yaml", stop_after=0)
    settings = DaemonSettings(output_dir=str(tmp_path), config_path=str(tmp_path / "x.yaml"))  # type: ignore[arg-type]
    assert isinstance(settings.output_dir, Path)


def test_a_base_model_that_does_not_load_stops_the_daemon(make_rig) -> None:
    rig = make_rig()
    rig.store.close()
    rig.store = None
    rig.lora(f"{NAME}_000000100.safetensors")
    settings = DaemonSettings(
        output_dir=rig.output_dir, config_path=rig.config_path, settle_seconds=0.1, poll_interval_seconds=0.05
    )

    def no_model(config) -> None:
        raise ModelError("/nowhere: no such file or folder", key="name_or_path")

    with pytest.raises(ModelError, match="nowhere"):
        run_daemon(settings, renderer_factory=no_model)
    assert "last state: stopped" in status_report(rig.output_dir)
    with _daemon_lock(state_dir(rig.samples_dir)):  # released on the way out
        pass


@pytest.mark.slow
def test_the_demo_renders_every_checkpoint_of_a_simulated_training_run(tmp_path: Path) -> None:
    from sidecar.app.demo import run_demo

    result = run_demo(tmp_path / "demo", checkpoints=2)

    assert result.exit_code == 0 and result.failures == ()
    assert [folder.name for folder in result.step_dirs] == [
        "step_000000",
        "step_000100",
        "step_000200",
        "step_000300",
    ]
    assert len(list((result.samples_dir / "step_000000").glob("sample_*.png"))) == 3  # the baseline
    assert result.images == 9
    assert str(result.samples_dir) in result.summary()


def test_a_closed_slot_parks_the_pipeline_and_the_next_render_unparks_it(make_rig, monkeypatch) -> None:
    """One-GPU sharing: no VRAM held while the trainer has the card or while there is nothing
    to render (cuda faked by recording)."""
    import torch

    from sidecar.render import devices

    moves: list[str] = []
    monkeypatch.setattr(devices, "park", lambda pipe, device=None: moves.append("park"))
    monkeypatch.setattr(devices, "unpark", lambda pipe, device, mode: moves.append(f"unpark:{mode}"))
    rig = make_rig()
    rig.renderer.placement = devices.Placement(
        device=torch.device("cuda", 0), policy=devices.MemoryPolicy("model")
    )
    rig.lora(f"{NAME}_000000100.safetensors", step=100)
    rig.scan()
    rig.run(0.0, 1.5)
    assert rig.jobs()[100].state == "done" and moves == []  # on the card from the start: nothing to undo

    rig.gate.is_open = False
    rig.run(3.0, 4.0)
    assert moves == ["park"]  # parked once, not once per idle iteration

    rig.lora(f"{NAME}_000000200.safetensors", step=200)
    rig.scan()
    rig.run(5.0, 6.5)
    assert 200 not in rig.jobs() or rig.jobs()[200].state == "pending"
    rig.gate.is_open = True
    rig.run(7.0, 8.0)
    assert rig.jobs()[200].state == "done"
    assert moves == ["park", "unpark:model", "park"]  # idle again: the card goes back to the trainer


def test_the_idle_wait_ends_when_the_watcher_has_news(make_rig) -> None:
    """The back-off wakes on an event instead of sleeping its full length (detection latency)."""
    import threading

    rig = make_rig()
    lora = rig.lora(f"{NAME}_000000100.safetensors")
    timer = threading.Timer(0.05, lambda: rig.event("created", lora))
    started = time.monotonic()
    timer.start()
    rig.worker.wait_for_work(60.0)
    timer.join()
    assert time.monotonic() - started < 30.0  # woke on the event, long before the back-off ran out
    assert not rig.worker.events.empty()
    rig.worker.events.get_nowait()
    rig.worker.request_stop()
    started = time.monotonic()
    rig.worker.wait_for_work(60.0)  # nothing queued, but a stop request never waits
    assert time.monotonic() - started < 30.0
