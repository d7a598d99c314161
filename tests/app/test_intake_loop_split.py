"""The intake loop on ai-toolkit's split Wan 2.2 files: one job per step, its files copied together.

Driven one `loop_once(now)` at a time with fake time, as tests/app/test_intake_loop.py; the files
are small real safetensors (the intake reads headers only, nothing renders here; the daemon
rendering such a pair with both experts is tests/app/test_watch_wan22.py).
"""

from __future__ import annotations

import json
import queue
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from sidecar.app.intake_loop import Intake
from sidecar.app.plan_source import PlanSource
from sidecar.intake.cache import CheckpointCache, combined_hash, content_hash
from sidecar.intake.layouts import recognise
from sidecar.intake.split import SIBLING_GRACE_SECONDS
from sidecar.intake.steps import StepCounter
from sidecar.intake.watcher import FileEvent, scan_tree
from sidecar.jobs.records import CheckpointJob
from sidecar.jobs.store import JobStore
from sidecar.settings import SamplesFolder
from sidecar.testing.trainer import write_trainer_config
from sidecar.weights import split_sibling

SETTLE_SECONDS, ABANDON_SECONDS, GRACE = 1.0, 60.0, SIBLING_GRACE_SECONDS
PROMPTS = ("a fox in the snow", "a fox on a beach")
NAME = "my_wan22_lora"


class Rig:
    """An intake on a temp output folder; `start` again is a new process on the same samples folder."""

    def __init__(self, root: Path) -> None:
        (root / "model").mkdir()  # the plan reads nothing of the model; nothing renders here
        self.output_dir = root / "output" / NAME
        self.output_dir.mkdir(parents=True)
        self.config = write_trainer_config(
            root / "train.yaml",
            model_folder=root / "model",
            training_folder=root / "output",
            name=NAME,
            prompts=PROMPTS,
            sample_steps=2,
            save_every=1,
        )
        self.folder = SamplesFolder(self.output_dir / "samples")
        self.store: JobStore | None = None
        self.start()

    def start(self) -> None:
        if self.store is not None:
            self.store.close()
        self.store = JobStore(self.folder.jobs, now=0.0)
        self.cache = CheckpointCache(self.folder.cache)
        self.intake = Intake(
            output_dir=self.output_dir,
            events=queue.Queue(),
            store=self.store,
            cache=self.cache,
            plans=PlanSource(self.config),
            steps=StepCounter(),
            settle_seconds=SETTLE_SECONDS,
            abandon_seconds=ABANDON_SECONDS,
        )

    def write(self, stem: str, part: str, *, fill: float = 1.0, step: int | None = None) -> Path:
        """One file as ai-toolkit writes it, and its close event (both parts carry the same metadata)."""
        path = self.output_dir / f"{stem}_{part}_noise.safetensors"
        metadata = {"training_info": json.dumps({"step": step, "epoch": 0})} if step is not None else None
        tensors = {"diffusion_model.blocks.0.attn1.to_q.lora_A.weight": np.full((4, 8), fill, np.float32)}
        save_file(tensors, str(path), metadata=metadata)
        self.event("closed", path)
        return path

    def event(self, kind: str, path: Path) -> None:
        self.intake.events.put(FileEvent(kind, path, recognise(path, root=self.output_dir)))  # type: ignore[arg-type]

    def scan(self) -> None:
        for event in scan_tree(self.output_dir, root=self.output_dir):
            self.intake.events.put(event)

    def run(self, *times: float) -> None:
        for now in times:
            self.intake.loop_once(now)

    def jobs(self) -> dict[int | None, CheckpointJob]:
        assert self.store is not None
        return {job.step: job for job in self.store.checkpoints()}

    def cached(self) -> list[str]:
        return sorted(
            str(path.relative_to(self.folder.cache)) for path in self.folder.cache.rglob("*.safetensors")
        )


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    made = Rig(tmp_path)
    yield made
    assert made.store is not None
    made.store.close()


def test_the_high_then_low_file_of_a_step_are_one_job_copied_together(rig: Rig) -> None:
    high = rig.write(f"{NAME}_000000500", "high", fill=1.0)
    rig.run(0.0)
    assert rig.jobs() == {} and rig.intake.tracking  # whole and closed, but its sibling may follow
    low = rig.write(f"{NAME}_000000500", "low", fill=2.0)  # right after, in the same save
    rig.run(0.3)

    (job,) = rig.jobs().values()
    digest = combined_hash([content_hash(high), content_hash(low)])
    assert (job.step, job.path, job.layout, job.content_hash) == (500, high, "ai-toolkit", digest)
    assert job.size_bytes == high.stat().st_size + low.stat().st_size
    assert len(rig.store.samples(job.id)) == len(PROMPTS)  # type: ignore[union-attr]
    assert rig.cached() == [f"{digest}/{high.name}", f"{digest}/{low.name}"]
    source = rig.cache.source_of(job.content_hash, job.path)  # what the renderer is handed
    assert source.name == high.name and split_sibling(source).read_bytes() == low.read_bytes()  # type: ignore[union-attr]
    assert not rig.intake.tracking

    # A restart's scan sees both files again: nothing new is tracked, copied or added.
    rig.start()
    rig.scan()
    rig.run(10.0)
    assert not rig.intake.tracking and list(rig.jobs()) == [500] and rig.jobs()[500].added_at == job.added_at

    # The trainer resumes and rewrites the step's low-noise file: the same job, the new pair's content.
    rig.write(f"{NAME}_000000500", "low", fill=3.0)
    rig.run(20.0)
    (rewritten,) = rig.jobs().values()
    assert rewritten.id == job.id and rewritten.path == high
    assert rewritten.content_hash == combined_hash([content_hash(high), content_hash(low)]) != digest
    assert "rewritten in place" in (rewritten.note or "")


def test_a_run_writing_only_high_noise_files_gets_each_step_after_the_grace(rig: Rig) -> None:
    """`train_low_noise: false`: one file per step, ever."""
    first = rig.write(f"{NAME}_000000250", "high")
    rig.run(0.0, GRACE - 0.5)
    assert rig.jobs() == {}
    assert "waiting for its sibling" in rig.intake.waiting()[0][1]
    rig.run(GRACE)
    second = rig.write(f"{NAME}_000000500", "high", fill=2.0)
    rig.run(30.0, 30.0 + GRACE)

    jobs = rig.jobs()
    assert sorted(jobs) == [250, 500]
    assert [jobs[250].path, jobs[500].path] == [first, second]
    assert jobs[250].content_hash == content_hash(first)  # one file: its own hash, as any checkpoint
    assert rig.cached() == sorted(f"{content_hash(path)}/{path.name}" for path in (first, second))


def test_the_final_pair_is_one_final_checkpoint_at_the_step_in_its_metadata(rig: Rig) -> None:
    high = rig.write(NAME, "high", step=1000)
    rig.write(NAME, "low", fill=2.0, step=1000)
    rig.run(0.0)

    (job,) = rig.jobs().values()
    assert (job.step, job.path, job.is_final, job.layout) == (1000, high, True, "final")


def test_a_sibling_linked_out_of_the_watched_folder_fails_the_step_unread(rig: Rig, tmp_path: Path) -> None:
    secret = tmp_path / "secret.safetensors"
    save_file({"x": np.zeros(4, np.float32)}, str(secret))
    low = rig.output_dir / f"{NAME}_000000500_low_noise.safetensors"
    low.symlink_to(secret)
    rig.write(f"{NAME}_000000500", "high")
    rig.event("created", low)
    rig.run(0.0, GRACE)

    (job,) = rig.jobs().values()
    assert job.state == "failed" and job.step == 500
    assert f"{low} is a symlink to {secret}, outside the watched folder" in (job.error or "")
    assert rig.cached() == []
