"""The dispatcher (`sidecar.app.dispatch`): claim a checkpoint, render it, publish the step.

Driven one `loop_once(now)` at a time with fake time and no threads, behind a real intake
(so checkpoints arrive as the daemon gets them: copied into the cache, with the plan of
their time), rendering with the tiny SDXL model.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import json
import logging
import os
import queue
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from sidecar.app.commands import status as status_command
from sidecar.app.dispatch import Dispatcher
from sidecar.app.intake_loop import Intake
from sidecar.app.plan_source import PlanSource
from sidecar.app.status import status_report
from sidecar.errors import SidecarError, TransientError
from sidecar.intake.cache import CheckpointCache
from sidecar.intake.layouts import recognise
from sidecar.intake.steps import StepCounter
from sidecar.intake.watcher import FileEvent, scan_tree
from sidecar.jobs.policy import WRITE_RETRY_BASE_SECONDS
from sidecar.jobs.records import CheckpointJob
from sidecar.jobs.store import JobStore
from sidecar.publish.tensorboard import TensorBoardSink, sample_tag
from sidecar.render.slots import AlwaysOpen, SlotGate
from sidecar.settings import SamplesFolder
from sidecar.testing.loras import write_lora
from sidecar.testing.tiny import save_tiny_model
from sidecar.testing.trainer import write_trainer_config

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning", "ignore::UserWarning")

SETTLE_SECONDS = 1.0
ABANDON_SECONDS = 5.0
PROMPTS = ("a photo of [trigger]", "[trigger] in the snow")
NAME = "demo_lora"
CLOSED_REASON = "the trainer holds the GPU"


@pytest.fixture(autouse=True)
def collectable_heap() -> Iterator[None]:
    """A dispatcher freezes the heap when its base loads (`_freeze_heap`); each test ends unfrozen."""
    yield
    gc.unfreeze()


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
        self.batch_sizes: list[int] = []
        self.fail_apply: list[Exception] = []
        self.before_image: Callable[[], None] | None = None

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def apply_lora(self, path):
        self.applied.append(Path(path))
        if self.fail_apply:
            raise self.fail_apply.pop(0)
        return self.inner.apply_lora(path)

    def render_resilient(self, requests, *, batch_size: int = 1) -> Iterator:
        self.batch_sizes.append(batch_size)
        for request, image in self.inner.render_resilient(requests, batch_size=batch_size):
            self.rendered.append(request.index)
            if self.before_image is not None:
                self.before_image()
            yield request, image


class SwitchProbe:
    """A slot probe the test opens and closes."""

    def __init__(self) -> None:
        self.open = True
        self.taken_at_hold = 0  # how many holds fail as if the trainer took the slot first

    def is_open(self, now: float) -> bool:
        return self.open

    def describe(self) -> str:
        return "slot open" if self.open else CLOSED_REASON

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        if self.taken_at_hold:
            self.taken_at_hold -= 1
            raise TransientError("the slot closed before the render started")
        yield


@dataclass
class Rig:
    """An intake and a dispatcher on a temp output folder, with the pieces a test pokes at."""

    model: Path
    output_dir: Path
    samples_dir: Path
    config_path: Path
    renderer: CountingRenderer
    clock: FakeClock = field(default_factory=FakeClock)
    probe: SwitchProbe = field(default_factory=SwitchProbe)
    tensorboard: TensorBoardSink | None = None
    store: JobStore | None = None
    intake: Intake | None = None
    dispatcher: Dispatcher | None = None

    @property
    def folder(self) -> SamplesFolder:
        return SamplesFolder(self.samples_dir)

    def start(self, *, backlog: str = "all") -> Dispatcher:
        """(Re)start intake and dispatcher on the same samples folder, as a new process would."""
        if self.store is not None:
            self.store.close()
        self.store = JobStore(self.folder.jobs, now=self.clock.now)
        cache = CheckpointCache(self.folder.cache)
        plans = PlanSource(self.config_path)
        steps = StepCounter()
        self.intake = Intake(
            output_dir=self.output_dir,
            events=queue.Queue(),
            store=self.store,
            cache=cache,
            plans=plans,
            steps=steps,
            settle_seconds=SETTLE_SECONDS,
            abandon_seconds=ABANDON_SECONDS,
        )
        self.dispatcher = Dispatcher(
            store=self.store,
            cache=cache,
            samples_dir=self.samples_dir,
            plans=plans,
            steps=steps,
            renderer_factory=lambda: self.renderer,
            gate=SlotGate(self.probe),
            backlog=backlog,  # type: ignore[arg-type]
            take_in=self.intake.loop_once,
            tensorboard=self.tensorboard,
            clock=self.clock,
        )
        return self.dispatcher

    def lora(self, name: str, *, step: int = 100) -> Path:
        path = self.output_dir / name
        write_lora(self.model, "sdxl", path, lora_format="kohya", seed=step, scale=step / 100)
        return path

    def scan(self) -> None:
        assert self.intake is not None
        for event in scan_tree(self.output_dir, root=self.output_dir):
            self.intake.events.put(event)

    def event(self, kind: str, path: Path) -> None:
        assert self.intake is not None
        self.intake.events.put(FileEvent(kind, path, recognise(path, root=self.output_dir)))  # type: ignore[arg-type]

    def run(self, *times: float) -> list[bool]:
        """One daemon iteration per time: the intake, then the dispatcher."""
        assert self.intake is not None and self.dispatcher is not None
        did = []
        for now in times:
            self.clock.now = now
            took_in = self.intake.loop_once(now)
            did.append(self.dispatcher.loop_once(now) or took_in)
        return did

    def jobs(self) -> dict[int | None, CheckpointJob]:
        assert self.store is not None
        return {job.step: job for job in self.store.checkpoints()}

    def images(self, step: int, suffix: str = "png") -> list[Path]:
        return sorted(self.folder.step(step).glob(f"sample_*.{suffix}"))

    def cached(self) -> list[Path]:
        return sorted(path for path in self.folder.cache.rglob("*") if path.is_file())

    def state(self) -> str:
        return json.loads(self.folder.state_file.read_text())["state"]


@pytest.fixture
def make_rig(tmp_path: Path, tiny_sdxl: Path, base_renderer) -> Iterator[Callable[..., Rig]]:
    rigs: list[Rig] = []

    def make(*, prompts: Sequence[str] = PROMPTS, tensorboard: Path | None = None) -> Rig:
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
        rig = Rig(
            model=tiny_sdxl,
            output_dir=output_dir,
            samples_dir=output_dir / "samples",
            config_path=config_path,
            renderer=CountingRenderer(base_renderer),
            tensorboard=TensorBoardSink(tensorboard) if tensorboard is not None else None,
        )
        rig.start()
        rigs.append(rig)
        return rig

    yield make
    for rig in rigs:
        if rig.store is not None:
            rig.store.close()
        if rig.tensorboard is not None:
            rig.tensorboard.close()


# --- claims and rendering -------------------------------------------------------------------


def test_a_checkpoint_is_rendered_once_and_its_copy_dropped(make_rig) -> None:
    rig = make_rig()
    lora = rig.lora(f"{NAME}_000000100.safetensors")
    rig.scan()
    rig.run(0.0, 0.5)
    assert rig.renderer.applied == []  # not settled yet: nothing to claim

    rig.run(1.5)

    assert rig.jobs()[100].state == "done"
    assert [p.name for p in rig.images(100)] == ["sample_00.png", "sample_01.png"]
    assert rig.renderer.rendered == [0, 1]
    assert rig.renderer.applied[0].parent.parent == rig.folder.cache  # rendered from the copy
    assert (rig.folder.step(100) / "grid.png").is_file()  # published: the step's contact sheet
    assert (rig.samples_dir / "index.html").is_file()  # and the gallery
    # the same file seen again (a late event, the next startup scan): nothing new
    rig.event("modified", lora)
    rig.scan()
    rig.run(3.0, 5.0)
    assert rig.renderer.rendered == [0, 1]
    assert rig.cached() == []  # the copy is dropped when done
    assert rig.state() == "idle"


def test_a_checkpoint_pruned_after_it_was_whole_is_still_rendered(make_rig) -> None:
    rig = make_rig()
    rig.probe.open = False  # ingest happens, rendering waits
    path = rig.lora(f"{NAME}_000000100.safetensors")
    rig.scan()
    rig.run(0.0, 1.5)
    assert rig.jobs()[100].state == "pending"
    assert rig.state() == f"waiting for a slot: {CLOSED_REASON}"

    path.unlink()  # max_step_saves_to_keep
    rig.event("deleted", path)
    rig.probe.open = True
    rig.run(2.0)

    assert rig.jobs()[100].state == "done"
    assert len(rig.images(100)) == 2
    assert rig.renderer.applied[0].parent.parent == rig.folder.cache


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
    assert rig.jobs()[100].state == "done"
    assert rig.jobs()[200].state == "pending"

    rig.run(rig.clock.now + 1)

    assert rig.jobs()[200].state == "done" and len(rig.images(200)) == 3


def test_restart_renders_only_the_missing_samples(make_rig) -> None:
    rig = make_rig(prompts=("one [trigger]", "two [trigger]", "three [trigger]"))
    path = rig.lora(f"{NAME}_000000100.safetensors")
    rig.scan()
    rig.renderer.before_image = rig.dispatcher.request_stop  # a SIGTERM during the first image
    rig.run(0.0, 1.5)
    assert rig.dispatcher.stop_requested
    assert rig.jobs()[100].state == "pending"
    assert [s.state for s in rig.store.samples(rig.jobs()[100].id)] == ["done", "pending", "pending"]
    (first,) = rig.images(100)
    first_mtime = first.stat().st_mtime_ns
    assert rig.run(1.6) == [False]  # a stopped dispatcher claims nothing more
    assert rig.renderer.rendered == [0]
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


def test_backlog_latest_renders_the_newest_and_skips_older(make_rig) -> None:
    rig = make_rig()
    for step in (100, 200, 300):
        rig.lora(f"{NAME}_{step:09d}.safetensors", step=step)
    rig.start(backlog="latest")
    rig.scan()

    rig.run(0.0, 1.5, 2.0)

    states = {step: job.state for step, job in rig.jobs().items()}
    assert states == {100: "skipped", 200: "skipped", 300: "done"}


# --- failures -------------------------------------------------------------------------------


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
    assert rig.cached() == []  # a failed checkpoint's copy is dropped too


def test_a_transient_error_is_retried_after_a_backoff(make_rig) -> None:
    rig = make_rig()
    rig.renderer.fail_apply.append(TransientError("file busy"))
    rig.lora(f"{NAME}_000000100.safetensors")
    rig.scan()

    rig.run(0.0, 1.5)
    job = rig.jobs()[100]
    assert job.state == "pending" and "file busy" in job.error and job.retry_at > 1.5
    assert len(rig.cached()) == 1  # kept for the retry
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


def test_an_unexpected_error_fails_that_checkpoint_and_the_dispatcher_goes_on(make_rig, caplog) -> None:
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


# --- the slot gate and parking ----------------------------------------------------------------


def test_a_slot_taken_at_the_last_moment_leaves_the_checkpoint_waiting(make_rig) -> None:
    rig = make_rig()
    rig.probe.taken_at_hold = 1
    rig.lora(f"{NAME}_000000100.safetensors")
    rig.scan()

    rig.run(0.0, 1.5)
    job = rig.jobs()[100]
    assert job.state == "pending" and rig.renderer.applied == []
    assert job.attempts == 0  # the lost slot cost no attempt
    assert all(s.state == "pending" for s in rig.store.samples(job.id))
    assert rig.state().startswith("waiting for a slot: the slot closed")

    rig.run(2.0)
    assert rig.jobs()[100].state == "done"


def test_a_slot_closing_mid_checkpoint_stops_after_the_current_image(make_rig) -> None:
    rig = make_rig(prompts=("one [trigger]", "two [trigger]", "three [trigger]"))
    rig.lora(f"{NAME}_000000100.safetensors")
    rig.scan()

    def trainer_takes_the_card() -> None:
        rig.probe.open = False

    rig.renderer.before_image = trainer_takes_the_card
    rig.run(0.0, 1.5)
    rig.renderer.before_image = None

    job = rig.jobs()[100]
    assert job.state == "pending" and rig.renderer.rendered == [0]
    assert [s.state for s in rig.store.samples(job.id)] == ["done", "pending", "pending"]
    rig.probe.open = True
    rig.run(2.0)
    assert rig.jobs()[100].state == "done" and rig.renderer.rendered == [0, 1, 2]


def test_a_closed_slot_parks_the_pipeline_and_the_next_render_unparks_it(make_rig, monkeypatch) -> None:
    """One-GPU sharing: no VRAM held while the trainer has the card or while there is nothing
    to render (cuda faked by recording)."""
    import torch

    from sidecar.render import memory

    moves: list[str] = []
    monkeypatch.setattr(memory, "park", lambda pipe, device=None: moves.append("park"))
    monkeypatch.setattr(memory, "unpark", lambda pipe, device, mode: moves.append(f"unpark:{mode}"))
    rig = make_rig()
    placement = memory.Placement(device=torch.device("cuda", 0), policy=memory.MemoryPolicy("model"))
    monkeypatch.setattr(rig.renderer.inner, "placement", placement)
    rig.lora(f"{NAME}_000000100.safetensors", step=100)
    rig.scan()
    rig.run(0.0, 1.5)
    assert rig.jobs()[100].state == "done" and moves == []  # on the card from the start: nothing to undo

    rig.probe.open = False
    rig.run(3.0, 4.0)
    assert moves == ["park"]  # parked once, not once per idle iteration

    rig.lora(f"{NAME}_000000200.safetensors", step=200)
    rig.scan()
    rig.run(5.0, 6.5)
    assert rig.jobs()[200].state == "pending"
    rig.probe.open = True
    rig.run(7.0, 8.0)
    assert rig.jobs()[200].state == "done"
    assert moves == ["park", "unpark:model", "park"]  # idle again: the card goes back to the trainer


def test_a_card_of_its_own_is_never_parked(make_rig, monkeypatch) -> None:
    import torch

    from sidecar.render import memory
    from sidecar.render.slots import AlwaysOpen

    moves: list[str] = []
    monkeypatch.setattr(memory, "park", lambda pipe, device=None: moves.append("park"))
    rig = make_rig()
    rig.dispatcher.gate = SlotGate(AlwaysOpen())
    placement = memory.Placement(device=torch.device("cuda", 0), policy=memory.MemoryPolicy("model"))
    monkeypatch.setattr(rig.renderer.inner, "placement", placement)
    rig.lora(f"{NAME}_000000100.safetensors", step=100)
    rig.scan()

    rig.run(0.0, 1.5, 3.0, 4.0)  # rendered, then idle

    assert rig.jobs()[100].state == "done" and moves == []


# --- the plan stored with each checkpoint ---------------------------------------------------------


def tensorboard_tags_by_step(log_dir: Path) -> dict[int, set[str]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(log_dir), size_guidance={"images": 0})
    accumulator.Reload()
    tags: dict[int, set[str]] = {}
    for tag in accumulator.Tags()["images"]:
        for image in accumulator.Images(tag):
            tags.setdefault(image.step, set()).add(tag)
    return tags


def test_a_checkpoint_queued_before_a_config_edit_renders_and_publishes_with_its_own_plan(
    make_rig, tmp_path: Path
) -> None:
    pytest.importorskip("tensorboard")
    rig = make_rig(tensorboard=tmp_path / "tensorboard")
    old_requests = rig.intake.plans.plan.requests
    rig.probe.open = False  # step 100 is queued, not rendered, before the edit
    rig.lora(f"{NAME}_000000100.safetensors", step=100)
    rig.scan()
    rig.run(0.0, 1.5)
    assert rig.jobs()[100].state == "pending"

    document = yaml.safe_load(rig.config_path.read_text())
    sample = document["config"]["process"][0]["sample"]
    sample.update(prompts=["a new [trigger] one", "a new [trigger] two", "a new [trigger] three"])
    sample.update(format="jpg", batch_size=2)
    rig.config_path.write_text(yaml.safe_dump(document, sort_keys=False))
    later = time.time() + 10
    os.utime(rig.config_path, (later, later))
    rig.lora(f"{NAME}_000000200.safetensors", step=200)
    rig.scan()
    rig.probe.open = True
    rig.run(2.0)  # the reload, then the render of step 100
    new_requests = rig.intake.plans.plan.requests
    assert len(new_requests) == 3 and new_requests != old_requests
    assert rig.jobs()[100].state == "done" and 200 not in rig.jobs()
    rig.run(3.5)  # step 200 settles and is rendered with the new plan

    assert rig.jobs()[200].state == "done"
    assert [p.name for p in rig.images(100)] == ["sample_00.png", "sample_01.png"]
    assert rig.images(100, "jpg") == []
    texts = [(rig.folder.step(100) / f"sample_{i:02d}.txt").read_text().strip() for i in range(2)]
    assert texts == [request.prompt for request in old_requests]
    assert [p.name for p in rig.images(200, "jpg")] == ["sample_00.jpg", "sample_01.jpg", "sample_02.jpg"]
    assert rig.images(200) == []
    assert rig.renderer.batch_sizes == [1, 2]
    assert (rig.folder.step(100) / "grid.png").is_file() and (rig.folder.step(200) / "grid.png").is_file()
    assert tensorboard_tags_by_step(tmp_path / "tensorboard") == {
        100: {sample_tag(request) for request in old_requests},
        200: {sample_tag(request) for request in new_requests},
    }


# --- identical checkpoints, a full disk ------------------------------------------------------------


def test_a_checkpoint_equal_to_an_earlier_one_gets_its_own_step_with_linked_images(make_rig) -> None:
    rig = make_rig()
    first = rig.lora(f"{NAME}_000000100.safetensors", step=100)
    again = rig.output_dir / f"{NAME}_000000200.safetensors"
    again.write_bytes(first.read_bytes())  # a trainer that saved unchanged weights again
    rig.scan()
    rig.run(0.0, 1.5, 2.0)

    jobs = rig.jobs()
    assert (jobs[100].state, jobs[200].state) == ("done", "done")
    assert len(rig.renderer.applied) == 1 and rig.renderer.rendered == [0, 1]  # rendered once
    for original, linked in zip(rig.images(100), rig.images(200), strict=True):
        assert linked.name == original.name and linked.stat().st_ino == original.stat().st_ino
        assert "hard link of step_000100/" in linked.with_suffix(".txt").read_text()
    assert (rig.folder.step(200) / "grid.png").is_file()
    assert "same bytes as step 100" in jobs[200].note
    report = status_report(rig.samples_dir)
    assert "notes (latest 1):" in report and "same bytes as step 100" in report
    assert rig.cached() == []


def test_a_full_disk_gives_the_checkpoint_back_without_an_attempt_and_resumes(make_rig, monkeypatch) -> None:
    rig = make_rig()
    monkeypatch.setattr("sidecar.publish.files.WRITE_RETRY_SECONDS", ())  # the dispatcher's wait only
    real_replace = os.replace
    disk = {"full": True}

    def replace(src, dst, **dirs):
        if disk["full"] and str(dst).endswith(".png"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_replace(src, dst, **dirs)

    monkeypatch.setattr(os, "replace", replace)
    rig.lora(f"{NAME}_000000100.safetensors")
    rig.scan()
    rig.run(0.0, 1.5)

    job = rig.jobs()[100]
    assert (job.state, job.attempts) == ("pending", 0)
    assert job.retry_at == 1.5 + WRITE_RETRY_BASE_SECONDS and "No space left on device" in job.error
    assert rig.state().startswith("cannot write samples, trying again in 10 s")
    assert rig.images(100) == [] and not [p for p in rig.samples_dir.rglob("*.tmp")]
    rig.run(5.0)
    assert rig.jobs()[100].state == "pending"  # still waiting for its retry time

    disk["full"] = False
    rig.run(1.5 + WRITE_RETRY_BASE_SECONDS)

    assert rig.jobs()[100].state == "done" and len(rig.images(100)) == 2


# --- what `sidecar status` shows ----------------------------------------------------------------


def test_status_report_shows_queue_last_step_and_failures(make_rig) -> None:
    rig = make_rig()
    rig.lora(f"{NAME}_000000100.safetensors", step=100)
    (rig.output_dir / f"{NAME}_000000200.safetensors").write_bytes(b"")
    rig.scan()
    rig.run(0.0, 1.5, ABANDON_SECONDS + 1)
    rig.probe.open = False
    rig.lora(f"{NAME}_000000300.safetensors", step=300)
    rig.scan()
    rig.run(10.0, 12.0)

    report = status_report(rig.samples_dir)

    assert f"samples folder: {rig.samples_dir}" in report
    assert f"waiting for a slot: {CLOSED_REASON}" in report
    assert "last rendered: step 100" in report
    assert "queue (1):" in report and "step 300" in report
    assert "failures (1):" in report and "file is empty" in report
    assert status_command(rig.output_dir, output=None) == report  # an output folder finds its samples/


def test_status_report_without_a_store_says_where_it_looked(tmp_path: Path) -> None:
    with pytest.raises(SidecarError, match="no sidecar job store"):
        status_report(tmp_path)


# --- publishing off the render path, loading the base ahead ---------------------------------------


def test_publishing_on_its_thread_never_holds_up_the_next_checkpoint(make_rig, monkeypatch) -> None:
    import threading

    from sidecar.publish import step as step_module
    from sidecar.publish.step import StepPublisher

    rig = make_rig()
    rig.dispatcher.publisher = StepPublisher(rig.samples_dir)  # the daemon's: a thread of its own
    release = threading.Event()
    publish_one = step_module._publish_one

    def slow(*args, **kwargs) -> None:  # a gallery of a long run on a slow disk
        assert release.wait(60)
        publish_one(*args, **kwargs)

    monkeypatch.setattr(step_module, "_publish_one", slow)
    rig.lora(f"{NAME}_000000100.safetensors", step=100)
    rig.lora(f"{NAME}_000000200.safetensors", step=200)
    rig.scan()
    rig.run(0.0, 1.5, 2.0)

    assert (rig.jobs()[100].state, rig.jobs()[200].state) == ("done", "done")  # while 100 publishes
    assert not (rig.folder.step(100) / "grid.png").exists()
    release.set()
    rig.dispatcher.close()  # a stopping daemon publishes what is queued
    assert all((rig.folder.step(step) / "grid.png").is_file() for step in (100, 200))
    assert (rig.samples_dir / "index.html").is_file() and rig.dispatcher.publisher.published == 2


def test_a_step_rendered_but_not_published_before_a_kill_is_published_once_at_the_next_start(
    make_rig, monkeypatch, tmp_path: Path
) -> None:
    pytest.importorskip("tensorboard")
    from sidecar.publish.step import StepPublisher

    rig = make_rig(tensorboard=tmp_path / "tensorboard")
    with monkeypatch.context() as killed:  # killed after the step was done, before its publication
        killed.setattr(StepPublisher, "submit", lambda self, step, requests: None)
        rig.lora(f"{NAME}_000000100.safetensors", step=100)
        rig.scan()
        rig.run(0.0, 1.5)
    assert rig.jobs()[100].state == "done" and not (rig.folder.step(100) / "grid.png").exists()

    for _ in range(2):  # the next start publishes it; the one after has nothing to do
        rig.start()
        rig.run(2.0)
    rig.tensorboard.close()

    assert (rig.folder.step(100) / "grid.png").is_file() and (rig.samples_dir / "index.html").is_file()
    requests = rig.intake.plans.plan.requests
    assert tensorboard_tags_by_step(tmp_path / "tensorboard") == {100: {sample_tag(r) for r in requests}}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    assert len(events.Images(sample_tag(requests[0]))) == 1  # exactly once


def test_the_base_preloads_on_a_thread_once_and_the_loop_takes_it(make_rig) -> None:
    import threading

    rig = make_rig()
    loaded_on: list[str] = []

    def factory():
        loaded_on.append(threading.current_thread().name)
        return rig.renderer

    rig.dispatcher.renderer_factory = factory
    rig.dispatcher.gate = SlotGate(AlwaysOpen())  # a card of its own
    rig.dispatcher.preload()
    rig.dispatcher.preload()  # already loading: no second load
    rig.lora(f"{NAME}_000000100.safetensors", step=100)
    rig.scan()
    rig.run(0.0, 1.5)

    assert loaded_on == ["sidecar-load-base"] and rig.jobs()[100].state == "done"
    assert gc.get_freeze_count() > 0  # the base's objects: out of the full collections' way
    rig.dispatcher.preload()  # loaded: nothing to do
    assert loaded_on == ["sidecar-load-base"]


def test_a_base_that_fails_to_preload_stops_the_daemon_when_it_is_needed(make_rig) -> None:
    from sidecar.errors import ModelError

    rig = make_rig()

    def broken():
        raise ModelError("does not load (a fake)", key="name_or_path")

    rig.dispatcher.renderer_factory = broken
    rig.dispatcher.gate = SlotGate(AlwaysOpen())
    rig.dispatcher.preload()
    rig.run(0.0)  # nothing queued: the error waits
    rig.lora(f"{NAME}_000000100.safetensors", step=100)
    rig.scan()
    with pytest.raises(ModelError, match="a fake"):
        rig.run(0.5, 1.5)


def test_on_a_shared_card_the_base_is_not_preloaded(make_rig) -> None:
    rig = make_rig()
    assert not rig.dispatcher.gate.always_open  # the rig's probe: a card shared with the trainer
    rig.dispatcher.renderer_factory = lambda: pytest.fail("loaded while the trainer may hold the card")
    rig.dispatcher.preload()
