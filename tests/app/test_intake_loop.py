"""The intake loop (`sidecar.app.intake_loop`): watcher events -> ready checkpoints in the job store.

Driven one `loop_once(now)` at a time with fake time and no threads, on real tiny-SDXL LoRA
files; nothing renders here (the dispatcher's tests render what the intake adds).
"""

from __future__ import annotations

import logging
import os
import queue
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from sidecar.app.intake_loop import Intake
from sidecar.app.plan_source import PlanSource
from sidecar.intake.cache import CheckpointCache, content_hash
from sidecar.intake.layouts import recognise
from sidecar.intake.steps import StepCounter
from sidecar.intake.watcher import FileEvent, scan_tree
from sidecar.jobs.records import CheckpointJob
from sidecar.jobs.store import JobStore
from sidecar.settings import SamplesFolder
from sidecar.testing.loras import write_lora
from sidecar.testing.trainer import write_trainer_config

SETTLE_SECONDS = 1.0
ABANDON_SECONDS = 5.0
PROMPTS = ("a photo of [trigger]", "[trigger] in the snow")
NAME = "demo_lora"


@dataclass
class IntakeRig:
    """An intake on a temp output folder, with the pieces a test pokes at."""

    model: Path
    output_dir: Path
    samples_dir: Path
    config_path: Path
    store: JobStore | None = None
    intake: Intake | None = None

    @property
    def folder(self) -> SamplesFolder:
        return SamplesFolder(self.samples_dir)

    def start(self, *, follow_symlinks: bool = False) -> Intake:
        """(Re)start the intake on the same samples folder, as a new process would."""
        if self.store is not None:
            self.store.close()
        self.store = JobStore(self.folder.jobs, now=0.0)
        self.intake = Intake(
            output_dir=self.output_dir,
            events=queue.Queue(),
            store=self.store,
            cache=CheckpointCache(self.folder.cache),
            plans=PlanSource(self.config_path),
            steps=StepCounter(),
            follow_symlinks=follow_symlinks,
            settle_seconds=SETTLE_SECONDS,
            abandon_seconds=ABANDON_SECONDS,
        )
        return self.intake

    def lora(self, name: str, *, step: int = 100, metadata: dict[str, str] | None = None) -> Path:
        path = self.output_dir / name
        write_lora(
            self.model, "sdxl", path, lora_format="kohya", seed=step, scale=step / 100, metadata=metadata
        )
        return path

    def scan(self) -> None:
        assert self.intake is not None
        for event in scan_tree(self.output_dir, root=self.output_dir):
            self.intake.events.put(event)

    def event(self, kind: str, path: Path) -> None:
        assert self.intake is not None
        self.intake.events.put(FileEvent(kind, path, recognise(path, root=self.output_dir)))  # type: ignore[arg-type]

    def run(self, *times: float) -> list[bool]:
        assert self.intake is not None
        return [self.intake.loop_once(now) for now in times]

    def jobs(self) -> dict[int | None, CheckpointJob]:
        assert self.store is not None
        return {job.step: job for job in self.store.checkpoints()}

    def prompts(self, step: int) -> list[str]:
        """The prompts stored with a checkpoint's sample rows, in index order."""
        assert self.store is not None
        return [sample.request.prompt for sample in self.store.samples(self.jobs()[step].id)]

    def cached(self) -> list[Path]:
        return sorted(path for path in self.folder.cache.rglob("*") if path.is_file())

    def nothing_to_render(self, now: float) -> bool:
        assert self.store is not None
        return self.store.claim_next_checkpoint(now) is None

    def edit_config(self, change: Callable[[dict], None], *, mtime: float) -> None:
        """Change the trainer config's first process and give the file a later mtime."""
        document = yaml.safe_load(self.config_path.read_text())
        change(document["config"]["process"][0])
        self.config_path.write_text(yaml.safe_dump(document, sort_keys=False))
        os.utime(self.config_path, (mtime, mtime))


@pytest.fixture
def make_rig(tmp_path: Path, tiny_sdxl: Path) -> Iterator[Callable[..., IntakeRig]]:
    rigs: list[IntakeRig] = []

    def make(*, prompts: Sequence[str] = PROMPTS) -> IntakeRig:
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
        rig = IntakeRig(
            model=tiny_sdxl,
            output_dir=output_dir,
            samples_dir=output_dir / "samples",
            config_path=config_path,
        )
        rig.start()
        rigs.append(rig)
        return rig

    yield make
    for rig in rigs:
        if rig.store is not None:
            rig.store.close()


# --- events and readiness -------------------------------------------------------------------


def test_a_checkpoint_is_copied_and_added_once_after_it_settles(make_rig) -> None:
    rig = make_rig()
    lora = rig.lora(f"{NAME}_000000100.safetensors")
    rig.scan()

    assert rig.run(0.0) == [True]  # the scan's event, tracked
    rig.run(0.5)
    assert rig.jobs() == {} and rig.cached() == []  # whole, but not settled yet

    rig.run(1.5)

    job = rig.jobs()[100]
    assert job.state == "pending" and job.content_hash == content_hash(lora)
    assert rig.prompts(100) == [request.prompt for request in rig.intake.plans.plan.requests]
    assert len(rig.prompts(100)) == len(PROMPTS)
    (copy,) = rig.cached()
    assert copy == rig.folder.cache / job.content_hash / lora.name
    assert copy.read_bytes() == lora.read_bytes()
    # the same file seen again (a late event, the next startup scan): not tracked, nothing new
    rig.event("modified", lora)
    rig.scan()
    rig.run(3.0)
    assert rig.intake.is_settled() and not rig.intake.tracking
    rig.run(5.0)
    assert list(rig.jobs()) == [100] and rig.jobs()[100].added_at == job.added_at
    assert len(rig.store.samples(job.id)) == len(PROMPTS)


def test_a_half_written_checkpoint_is_read_only_once_whole(make_rig) -> None:
    rig = make_rig()
    path = rig.output_dir / f"{NAME}_000000100.safetensors"
    data = rig.lora("staging_lora.safetensors").read_bytes()
    (rig.output_dir / "staging_lora.safetensors").unlink()
    path.write_bytes(data[: len(data) // 2])
    rig.event("created", path)

    rig.run(0.0, 2.0, 4.0)
    assert rig.jobs() == {} and rig.cached() == []
    assert rig.intake.tracking  # still waiting for the rest

    path.write_bytes(data)
    rig.event("modified", path)
    rig.run(4.5, 6.0)

    job = rig.jobs()[100]
    assert job.state == "pending" and job.content_hash == content_hash(path)
    assert [copy.read_bytes() for copy in rig.cached()] == [data]


def test_a_checkpoint_truncated_for_good_is_recorded_failed_once(make_rig) -> None:
    rig = make_rig()
    path = rig.lora(f"{NAME}_000000100.safetensors")
    path.write_bytes(path.read_bytes()[:1000])
    rig.scan()

    rig.run(0.0, ABANDON_SECONDS + 1)

    (job,) = rig.jobs().values()
    assert job.state == "failed" and "truncated for good" in job.error
    assert rig.nothing_to_render(ABANDON_SECONDS + 1) and rig.cached() == []
    rig.start()  # a restart sees the same file again
    rig.scan()
    rig.run(10.0, 20.0)
    assert len(rig.jobs()) == 1


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
    assert rig.nothing_to_render(3.0)


def test_a_checkpoint_pruned_after_it_was_copied_stays_queued_from_its_copy(make_rig) -> None:
    rig = make_rig()
    path = rig.lora(f"{NAME}_000000100.safetensors")
    data = path.read_bytes()
    rig.scan()
    rig.run(0.0, 1.5)

    path.unlink()  # max_step_saves_to_keep
    rig.event("deleted", path)
    rig.run(2.0)

    assert rig.jobs()[100].state == "pending"  # not recorded vanished: nothing is lost
    assert [copy.read_bytes() for copy in rig.cached()] == [data]


def test_a_restart_drops_cached_copies_no_pending_checkpoint_needs(make_rig) -> None:
    rig = make_rig()
    rig.lora(f"{NAME}_000000100.safetensors", step=100)
    rig.scan()
    rig.run(0.0, 1.5)
    (kept,) = rig.cached()
    stale = rig.folder.cache / ("0" * 64) / "gone.safetensors"
    stale.parent.mkdir()
    stale.write_bytes(b"a copy of a checkpoint rendered long ago")
    partial = rig.folder.cache / ".0123abcd.partial"  # a copy a killed process left half done
    partial.write_bytes(b"half")

    rig.start()

    assert rig.cached() == [kept]
    assert not stale.parent.exists()


# --- steps ----------------------------------------------------------------------------------


def test_a_final_checkpoint_without_a_step_goes_one_past_the_highest(make_rig) -> None:
    rig = make_rig()
    rig.lora(f"{NAME}_000000100.safetensors", step=100)
    rig.lora(f"{NAME}_000000200.safetensors", step=200)
    rig.lora(f"{NAME}.safetensors", step=250)  # no step in the name, none in the metadata
    rig.scan()

    rig.run(0.0, 1.5)

    jobs = rig.jobs()
    assert sorted(jobs) == [100, 200, 201]
    assert jobs[201].is_final and jobs[201].state == "pending"
    assert not jobs[100].is_final and not jobs[200].is_final
    assert len(rig.prompts(201)) == len(PROMPTS)


def test_a_checkpoint_without_a_step_in_its_name_takes_it_from_metadata(make_rig) -> None:
    rig = make_rig()
    rig.lora("kohya_style.safetensors", step=3, metadata={"ss_steps": "750"})
    rig.lora(f"{NAME}.safetensors", step=4)  # no metadata: placed after the one that has it
    rig.scan()

    rig.run(0.0, 1.5)

    assert sorted(rig.jobs()) == [750, 751]


def test_a_final_checkpoint_with_no_step_and_no_history_is_step_one(make_rig) -> None:
    rig = make_rig()
    rig.lora(f"{NAME}.safetensors")
    rig.scan()

    rig.run(0.0, 1.5)

    assert sorted(rig.jobs()) == [1]  # step 0 is the baseline render of the base model


def test_a_restart_keeps_numbering_steps_after_the_highest_recorded(make_rig) -> None:
    rig = make_rig()
    rig.lora(f"{NAME}_000000300.safetensors", step=300)
    rig.scan()
    rig.run(0.0, 1.5)

    rig.start()  # a new process: the highest step comes from the store
    rig.lora(f"{NAME}.safetensors", step=350)
    rig.scan()
    rig.run(2.0, 3.5)

    assert sorted(rig.jobs()) == [300, 301]


# --- config reload --------------------------------------------------------------------------


def test_a_changed_sample_section_applies_to_later_checkpoints(make_rig, caplog) -> None:
    rig = make_rig()
    rig.lora(f"{NAME}_000000100.safetensors", step=100)
    rig.scan()
    rig.run(0.0, 1.5)
    assert len(rig.prompts(100)) == 2
    assert rig.jobs()[100].output == {"image_format": "png", "batch_size": 1}

    later = time.time() + 10

    def three_prompts_as_jpg(process: dict) -> None:
        process["sample"]["prompts"] = [*PROMPTS, "three"]
        process["sample"]["format"] = "jpg"

    rig.edit_config(three_prompts_as_jpg, mtime=later)
    rig.lora(f"{NAME}_000000200.safetensors", step=200)
    rig.scan()
    rig.run(2.0, 3.5)
    assert rig.prompts(200)[2] == "three" and len(rig.prompts(200)) == 3
    assert rig.jobs()[200].output == {"image_format": "jpg", "batch_size": 1}
    assert len(rig.prompts(100)) == 2  # a checkpoint keeps the plan it was added with
    assert rig.jobs()[100].output == {"image_format": "png", "batch_size": 1}

    rig.config_path.write_text(rig.config_path.read_text().replace("sample_steps: 2", "sample_steps: twenty"))
    os.utime(rig.config_path, (later + 10, later + 10))
    rig.lora(f"{NAME}_000000300.safetensors", step=300)
    rig.scan()
    with caplog.at_level(logging.ERROR, logger="sidecar.intake"):
        rig.run(4.0, 5.5)
    assert len(rig.prompts(300)) == 3  # the previous plan is kept
    (error,) = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert "sample_steps" in error.getMessage() and "trainer.yaml:" in error.getMessage()


# --- hostile files: links out of the folder, corrupt bytes; close events ----------------------


def test_a_checkpoint_linked_out_of_the_watched_folder_is_recorded_failed_and_never_read(
    make_rig, tmp_path: Path
) -> None:
    rig = make_rig()
    secret = tmp_path / "elsewhere" / "secret.safetensors"
    secret.parent.mkdir()
    secret.write_bytes(b"not for sidecar")
    link = rig.output_dir / f"{NAME}_000000100.safetensors"
    link.symlink_to(secret)
    rig.scan()
    rig.run(0.0, 2.0, 10.0)
    rig.event("modified", link)  # seen again: recorded once
    rig.run(11.0)

    (job,) = rig.jobs().values()
    assert job.state == "failed" and job.step == 100
    assert "outside the watched folder" in job.error and "--follow-symlinks" in job.error
    assert rig.cached() == [] and rig.intake.waiting() == []
    assert secret.read_bytes() == b"not for sidecar"


def test_follow_symlinks_reads_a_checkpoint_linked_in(make_rig, tmp_path: Path) -> None:
    rig = make_rig()
    storage = tmp_path / "storage"
    storage.mkdir()
    real = rig.lora(f"{NAME}_000000100.safetensors")
    real.rename(storage / real.name)
    real.symlink_to(storage / real.name)
    rig.start(follow_symlinks=True)
    rig.scan()
    rig.run(0.0, 1.5)
    assert rig.jobs()[100].state == "pending"
    assert rig.jobs()[100].content_hash == content_hash(storage / real.name)


def test_a_whole_checkpoint_closed_by_its_writer_is_taken_at_once(make_rig) -> None:
    rig = make_rig()
    lora = rig.lora(f"{NAME}_000000100.safetensors")
    rig.event("closed", lora)
    rig.run(0.0)  # no settle wait
    assert rig.jobs()[100].state == "pending"


def test_random_bytes_are_failed_once_settled_and_listed_until_then(make_rig) -> None:
    rig = make_rig()
    path = rig.output_dir / f"{NAME}_000000100.safetensors"
    path.write_bytes(random.Random(0).randbytes(40_000))  # its "header length" is far over the limit
    rig.scan()
    rig.run(0.0)
    ((waiting, reason),) = rig.intake.waiting()
    assert waiting == path and reason.startswith("not whole yet: header length field says")
    rig.run(SETTLE_SECONDS)
    job = rig.jobs()[100]
    assert job.state == "failed" and job.error.startswith("corrupt: header length field says")
    assert rig.intake.waiting() == []


# --- the plan's per-step seeds and cadence, applied at intake -----------------------------------


def test_a_per_step_seed_is_made_concrete_for_each_checkpoints_step(make_rig) -> None:
    rig = make_rig()
    rig.edit_config(lambda process: process["sample"].update(random_seed=True), mtime=time.time() + 10)
    rig.start()
    rig.lora(f"{NAME}_000000100.safetensors", step=100)
    rig.lora(f"{NAME}_000000200.safetensors", step=200)
    rig.scan()
    rig.run(0.0, SETTLE_SECONDS + 0.1)
    assert rig.store is not None
    store = rig.store
    seeds = {step: [s.request.seed for s in store.samples(job.id)] for step, job in rig.jobs().items()}
    assert seeds[100] != seeds[200]  # a new seed at every step, as the trainer samples
    stored = [sample.request for job in rig.jobs().values() for sample in rig.store.samples(job.id)]
    assert not any(request.seed_per_step for request in stored)  # concrete in the store


def test_a_checkpoint_before_the_first_sampled_step_is_recorded_skipped(make_rig) -> None:
    rig = make_rig()
    rig.edit_config(lambda process: process["sample"].update(sample_start_step=200), mtime=time.time() + 10)
    rig.start()
    rig.lora(f"{NAME}_000000100.safetensors", step=100)
    rig.lora(f"{NAME}_000000200.safetensors", step=200)
    rig.scan()
    rig.run(0.0, SETTLE_SECONDS + 0.1)
    jobs = rig.jobs()
    assert jobs[100].state == "skipped" and "starts at step 200" in (jobs[100].error or "")
    assert jobs[200].state == "pending"
