"""The watcher: a thin handler that only recognises paths, a startup scan, a real observer."""

from __future__ import annotations

import dataclasses
import queue
import re
import time
from pathlib import Path

import pytest
from watchdog.events import (
    DirCreatedEvent,
    DirModifiedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileOpenedEvent,
)

from sidecar.intake.watcher import CheckpointEventHandler, CheckpointWatcher, FileEvent, scan_tree

WAIT_SECONDS = 10.0  # an observer delivers within milliseconds; this bounds a broken one


def drain(events: queue.Queue[FileEvent]) -> list[FileEvent]:
    found = []
    while True:
        try:
            found.append(events.get_nowait())
        except queue.Empty:
            return found


def wait_for(events: queue.Queue[FileEvent], path: Path, *, kinds: tuple[str, ...]) -> FileEvent:
    """The first event for `path` of one of `kinds`, waiting at most WAIT_SECONDS."""
    deadline = time.monotonic() + WAIT_SECONDS
    while time.monotonic() < deadline:
        try:
            event = events.get(timeout=0.05)
        except queue.Empty:
            continue
        if event.path == path and event.kind in kinds:
            return event
    raise AssertionError(f"no {kinds} event for {path} within {WAIT_SECONDS} s")


@pytest.fixture
def handler(tmp_path: Path) -> CheckpointEventHandler:
    return CheckpointEventHandler(queue.Queue(), root=tmp_path)


def test_handler_turns_file_events_on_checkpoints_into_records(
    handler: CheckpointEventHandler, tmp_path: Path
) -> None:
    lora = tmp_path / "run_000000500.safetensors"
    handler.dispatch(FileCreatedEvent(str(lora)))
    handler.dispatch(FileModifiedEvent(str(lora)))
    handler.dispatch(FileClosedEvent(str(lora)))
    handler.dispatch(FileDeletedEvent(str(lora)))

    records = drain(handler.events)

    assert [r.kind for r in records] == ["created", "modified", "closed", "deleted"]
    assert {r.path for r in records} == {lora}
    assert all(r.checkpoint is not None and r.checkpoint.step == 500 for r in records)
    assert not any(r.is_directory for r in records)


def test_handler_drops_files_that_are_not_checkpoints(
    handler: CheckpointEventHandler, tmp_path: Path
) -> None:
    for name in (
        "samples/step_000100/sample_00.png",
        "optimizer.pt",
        "run_000000500.safetensors.tmp",
        "log.txt",
    ):
        handler.dispatch(FileCreatedEvent(str(tmp_path / name)))
    handler.dispatch(FileOpenedEvent(str(tmp_path / "run_000000500.safetensors")))

    assert drain(handler.events) == []


def test_handler_reports_a_move_as_its_source_deleted_and_its_destination(
    handler: CheckpointEventHandler, tmp_path: Path
) -> None:
    old, new = tmp_path / "run_000000100.safetensors", tmp_path / "run_000000200.safetensors"
    handler.dispatch(FileMovedEvent(str(old), str(new)))
    # a trainer writing to a temp name and renaming it in: only the destination counts
    handler.dispatch(FileMovedEvent(str(tmp_path / "run.safetensors.tmp"), str(tmp_path / "run.safetensors")))

    records = drain(handler.events)

    assert [(r.kind, r.path.name) for r in records] == [
        ("deleted", "run_000000100.safetensors"),
        ("moved", "run_000000200.safetensors"),
        ("moved", "run.safetensors"),
    ]


def test_handler_passes_folders_on_for_the_worker_to_scan(
    handler: CheckpointEventHandler, tmp_path: Path
) -> None:
    folder = tmp_path / "checkpoint-300"
    handler.dispatch(DirCreatedEvent(str(folder)))
    handler.dispatch(DirModifiedEvent(str(folder)))  # fires for every file inside: ignored
    handler.dispatch(DirMovedEvent(str(tmp_path / "tmp-300"), str(folder)))

    records = drain(handler.events)

    assert [(r.kind, r.path, r.is_directory, r.checkpoint) for r in records] == [
        ("created", folder, True, None),
        ("deleted", tmp_path / "tmp-300", True, None),
        ("moved", folder, True, None),
    ]


def test_records_are_immutable(tmp_path: Path) -> None:
    record = FileEvent("created", tmp_path / "x.safetensors")
    with pytest.raises(dataclasses.FrozenInstanceError):
        record.kind = "deleted"  # type: ignore[misc]


def test_handler_applies_a_user_pattern(tmp_path: Path) -> None:
    handler = CheckpointEventHandler(
        queue.Queue(), root=tmp_path, pattern=re.compile(r"weights@(?P<step>\d+)")
    )
    handler.dispatch(FileCreatedEvent(str(tmp_path / "weights@0700.safetensors")))

    (record,) = drain(handler.events)

    assert record.checkpoint is not None and record.checkpoint.step == 700


def test_startup_scan_feeds_every_existing_checkpoint_and_nothing_else(tmp_path: Path) -> None:
    wanted = [
        tmp_path / "run_000000100.safetensors",
        tmp_path / "checkpoint-200" / "pytorch_lora_weights.safetensors",
        tmp_path / "run.safetensors",
    ]
    unwanted = [
        tmp_path / "samples" / "step_000100" / "sample_00.png",
        tmp_path / "samples" / ".sidecar" / "cache" / "abc" / "run_000000100.safetensors",
        tmp_path / "checkpoint-200" / "optimizer.bin",
        tmp_path / "notes.txt",
    ]
    for path in wanted + unwanted:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    events: queue.Queue[FileEvent] = queue.Queue()

    count = CheckpointWatcher(tmp_path, events).scan()

    records = drain(events)
    assert count == len(records) == 3
    assert {r.path for r in records} == set(wanted)
    assert {r.kind for r in records} == {"scanned"}


def test_scan_tree_of_a_subfolder_keeps_paths_relative_to_the_root(tmp_path: Path) -> None:
    lora = tmp_path / "checkpoint-400" / "pytorch_lora_weights.safetensors"
    lora.parent.mkdir()
    lora.write_bytes(b"x")

    (record,) = list(scan_tree(lora.parent, root=tmp_path))

    assert record.checkpoint is not None and record.checkpoint.step == 400


@pytest.mark.parametrize("use_polling", [False, True], ids=["inotify", "polling"])
def test_real_observer_sees_a_created_checkpoint(tmp_path: Path, use_polling: bool) -> None:
    events: queue.Queue[FileEvent] = queue.Queue()
    lora = tmp_path / "run_000000100.safetensors"
    with CheckpointWatcher(tmp_path, events, use_polling=use_polling, polling_interval_seconds=0.1):
        lora.write_bytes(b"not yet whole")
        record = wait_for(events, lora, kinds=("created", "modified", "closed"))
        (tmp_path / "sample.png").write_bytes(b"png")
        lora.unlink()
        wait_for(events, lora, kinds=("deleted",))

    assert record.checkpoint is not None and record.checkpoint.step == 100
    assert all(r.path.suffix == ".safetensors" for r in drain(events))


def test_real_observer_reports_a_folder_moved_in(tmp_path: Path) -> None:
    staging = tmp_path.parent / f"{tmp_path.name}-staging"
    (staging / "checkpoint-500").mkdir(parents=True)
    (staging / "checkpoint-500" / "pytorch_lora_weights.safetensors").write_bytes(b"x")
    watched = tmp_path / "out"
    watched.mkdir()
    events: queue.Queue[FileEvent] = queue.Queue()
    with CheckpointWatcher(watched, events):
        (staging / "checkpoint-500").rename(watched / "checkpoint-500")
        record = wait_for(events, watched / "checkpoint-500", kinds=("created", "moved"))

    assert record.is_directory


def test_watching_a_missing_folder_says_which(tmp_path: Path) -> None:
    with (
        pytest.raises(FileNotFoundError, match="no-such"),
        CheckpointWatcher(tmp_path / "no-such", queue.Queue()),
    ):
        pass


def test_real_observer_watches_new_folders_but_not_the_samples_folder(tmp_path: Path) -> None:
    """Files in a folder made after the start are seen; sidecar's own writes in `samples/` and
    `.sidecar/` are not watched at all (watchdog would hold each of their renames 0.5 s)."""
    samples = tmp_path / "samples" / "step_000100"
    samples.mkdir(parents=True)
    events: queue.Queue[FileEvent] = queue.Queue()
    with CheckpointWatcher(tmp_path, events) as watcher:
        assert tmp_path / "samples" not in watcher._watches
        (tmp_path / "checkpoint-500").mkdir()
        wait_for(events, tmp_path / "checkpoint-500", kinds=("created",))
        lora = tmp_path / "checkpoint-500" / "pytorch_lora_weights.safetensors"
        lora.write_bytes(b"x")
        record = wait_for(events, lora, kinds=("created", "modified", "closed"))
        (tmp_path / "samples" / "run_000000300.safetensors").write_bytes(b"x")  # ignored even by name
        (samples / ".sample_00.png.tmp").write_bytes(b"png")
        (samples / ".sample_00.png.tmp").rename(samples / "sample_00.png")
        marker = tmp_path / "run_000000600.safetensors"
        marker.write_bytes(b"x")
        wait_for(events, marker, kinds=("created", "modified", "closed"))

    assert record.checkpoint is not None and record.checkpoint.step == 500
    assert all("samples" not in event.path.parts for event in drain(events))


# --- a watcher that fails is noticed, never left seeing nothing --------------------------------


def test_an_error_in_the_handler_is_recorded_and_wakes_the_daemon(tmp_path: Path, monkeypatch) -> None:
    events: queue.Queue[FileEvent] = queue.Queue()
    handler = CheckpointEventHandler(events, root=tmp_path)

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr("sidecar.intake.watcher.recognise", broken)
    handler.dispatch(FileCreatedEvent(str(tmp_path / "run_000000100.safetensors")))  # does not raise

    assert isinstance(handler.failure, RuntimeError)
    assert [event.kind for event in drain(events)] == ["failed"]


def test_a_pattern_without_a_step_group_never_raises_in_the_handler(tmp_path: Path) -> None:
    events: queue.Queue[FileEvent] = queue.Queue()
    handler = CheckpointEventHandler(events, root=tmp_path, pattern=re.compile(r"(?P<epoch>\d+)"))
    handler.dispatch(FileCreatedEvent(str(tmp_path / "odd-12.safetensors")))
    assert handler.failure is None
    assert [event.checkpoint.layout for event in drain(events)] == ["final"]  # type: ignore[union-attr]


def test_the_exclusions_come_before_a_broad_pattern(tmp_path: Path) -> None:
    """With `--polling` and `.*(?P<step>\\d+)`, sidecar's own cached copy is never a checkpoint."""
    events: queue.Queue[FileEvent] = queue.Queue()
    samples = tmp_path / "renders"
    handler = CheckpointEventHandler(
        events, root=tmp_path, pattern=re.compile(r".*?(?P<step>\d+)"), ignore=(samples,)
    )
    own = [
        tmp_path / "samples/.sidecar/cache/ab12/run_000000100.safetensors",
        samples / "step_000100/lora_000000100.safetensors",
        tmp_path / "run_000000100-optimizer.safetensors",
        tmp_path / "ema/run_000000100.safetensors",
    ]
    for path in own:
        handler.dispatch(FileCreatedEvent(str(path)))
    handler.dispatch(FileCreatedEvent(str(tmp_path / "run_000000100.safetensors")))
    assert [event.path for event in drain(events)] == [tmp_path / "run_000000100.safetensors"]


def test_a_dead_observer_is_reported_and_a_restart_rescans(tmp_path: Path, monkeypatch) -> None:
    events: queue.Queue[FileEvent] = queue.Queue()
    lora = tmp_path / "run_000000100.safetensors"
    lora.write_bytes(b"x")
    watcher = CheckpointWatcher(tmp_path, events)
    watcher.start()
    try:
        assert watcher.problem() is None
        watcher.handler.failure = RuntimeError("boom")
        assert watcher.problem() == "the file-event handler failed: RuntimeError: boom"
        watcher.handler.failure = None
        watcher._observer.stop()  # type: ignore[union-attr]  # the thread ends, as after an error in it
        watcher._observer.join(WAIT_SECONDS)  # type: ignore[union-attr]
        assert watcher.problem() == "the observer thread died"

        watcher.restart()

        assert watcher.problem() is None
        assert [event.path for event in drain(events) if event.kind == "scanned"] == [lora]
        second = tmp_path / "run_000000200.safetensors"
        second.write_bytes(b"x")
        wait_for(events, second, kinds=("created", "modified", "closed"))  # the new observer sees it
    finally:
        watcher.stop()
