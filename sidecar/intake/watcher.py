"""Seeing checkpoints arrive: a watchdog observer, a thin handler and a startup scan.

Detection is kept apart from work, as in watchdog's own observer / emitter / handler
split: the handler runs on the observer's thread and does nothing but recognise the
path (`sidecar.intake.layouts.recognise`, pure on the path) and put a small frozen
`FileEvent` on a `queue.Queue`. Everything else (is the file whole, hashing, rendering)
happens on the daemon's thread, which drains that queue.

Directory events are passed on too (`is_directory=True`) without looking inside: a
trainer that writes `checkpoint-500/` elsewhere and renames it in produces one event for
the folder, and the daemon scans it (`scan_tree`) on its own thread.

inotify sees nothing on NFS, SMB and most FUSE mounts; `use_polling=True` switches to
watchdog's `PollingObserver`, which compares directory listings every
`polling_interval_seconds`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Literal

from watchdog.events import (
    DirCreatedEvent,
    DirDeletedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver, ObservedWatch
from watchdog.observers.polling import PollingObserver

from sidecar.intake.layouts import Checkpoint, is_excluded_folder, recognise

logger = logging.getLogger("sidecar.intake")

EventKind = Literal["created", "modified", "closed", "moved", "deleted", "scanned", "failed"]
# Events that say the file's writer is done with it: closed after writing, or renamed into place.
FINISHED_KINDS: frozenset[EventKind] = frozenset({"closed", "moved"})

POLLING_INTERVAL_SECONDS = 1.0  # PollingObserver: how often it lists the tree
OBSERVER_JOIN_SECONDS = 5.0  # how long closing the watcher waits for the observer thread


@dataclass(frozen=True)
class FileEvent:
    """One thing that happened to a path under the watched folder.

    `checkpoint` is what `recognise` made of a file path; None for a directory.
    A `moved` event carries its destination; its source arrives as a `deleted` event.
    """

    kind: EventKind
    path: Path
    checkpoint: Checkpoint | None = None
    is_directory: bool = False


class _StopRaceFilter(logging.Filter):
    """watchdog 7 logs an ERROR when its inotify thread reads one more event while being
    stopped; nothing is lost then (we are stopping), so that one message is dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "called when the thread is inactive" not in record.getMessage()


_STOP_RACE_FILTER = _StopRaceFilter()


def _decode(path: str | bytes) -> Path:
    return Path(os.fsdecode(path))


class CheckpointEventHandler(FileSystemEventHandler):
    """Turns watchdog events into `FileEvent`s on `events`; files that are no checkpoint are dropped.

    Runs on the observer's thread: recognition (pure on the path) and a queue put, nothing else.
    """

    def __init__(
        self,
        events: queue.Queue[FileEvent],
        *,
        root: Path,
        pattern: re.Pattern[str] | None = None,
        ignore: tuple[Path, ...] = (),
        on_folder: Callable[[Path], None] | None = None,
    ) -> None:
        super().__init__()
        self.events = events
        self.root = Path(root)
        self.pattern = pattern
        self.ignore = ignore  # sidecar's own samples folder, where it lies under `root`
        self.on_folder = on_folder  # told of each new folder, so it can be watched too
        self.failure: BaseException | None = None  # the first error, until the watcher restarts

    def dispatch(self, event: FileSystemEvent) -> None:
        """watchdog's entry point, guarded: an error here would end the observer's thread, and the
        daemon would go on seeing nothing. It is recorded instead; the daemon restarts the watcher
        (a fresh observer and a rescan, so the event is not lost) or exits non-zero."""
        try:
            super().dispatch(event)
        except Exception as error:
            logger.exception("the file-event handler failed on %s", event.src_path)
            if self.failure is None:
                self.failure = error
            with contextlib.suppress(Exception):
                self.events.put(FileEvent("failed", _decode(event.src_path)))  # wakes the daemon

    def _put_file(self, kind: EventKind, path: Path) -> None:
        checkpoint = recognise(path, root=self.root, pattern=self.pattern, ignore=self.ignore)
        if checkpoint is not None:
            self.events.put(FileEvent(kind, path, checkpoint))

    def _put_folder(self, kind: EventKind, path: Path) -> None:
        if self.on_folder is not None:
            self.on_folder(path)
        self.events.put(FileEvent(kind, path, is_directory=True))

    def on_created(self, event: FileSystemEvent) -> None:
        if isinstance(event, DirCreatedEvent):
            self._put_folder("created", _decode(event.src_path))
        elif isinstance(event, FileCreatedEvent):
            self._put_file("created", _decode(event.src_path))

    def on_modified(self, event: FileSystemEvent) -> None:
        if isinstance(event, FileModifiedEvent):  # a folder's mtime changes with every file in it
            self._put_file("modified", _decode(event.src_path))

    def on_closed(self, event: FileSystemEvent) -> None:
        if isinstance(event, FileClosedEvent):  # inotify IN_CLOSE_WRITE: a writer is done, for now
            self._put_file("closed", _decode(event.src_path))

    def on_moved(self, event: FileSystemEvent) -> None:
        source, destination = _decode(event.src_path), _decode(event.dest_path)
        if isinstance(event, DirMovedEvent):
            self.events.put(FileEvent("deleted", source, is_directory=True))
            self._put_folder("moved", destination)
        elif isinstance(event, FileMovedEvent):
            self._put_file("deleted", source)
            self._put_file("moved", destination)

    def on_deleted(self, event: FileSystemEvent) -> None:
        if isinstance(event, DirDeletedEvent):
            self.events.put(FileEvent("deleted", _decode(event.src_path), is_directory=True))
        elif isinstance(event, FileDeletedEvent):
            self._put_file("deleted", _decode(event.src_path))


def scan_tree(
    folder: Path,
    *,
    root: Path,
    pattern: re.Pattern[str] | None = None,
    ignore: tuple[Path, ...] = (),
    kind: EventKind = "scanned",
) -> Iterator[FileEvent]:
    """A `kind` event (`scanned`) for every checkpoint file under `folder`, in sorted order.

    Hidden folders (`.sidecar`, `.git`) and symlinked folders are not entered. A folder that
    vanishes while it is walked simply yields less: the trainer pruned it.
    """
    for current, folders, files in os.walk(folder):
        folders[:] = sorted(name for name in folders if not name.startswith("."))
        for name in sorted(files):
            path = Path(current) / name
            checkpoint = recognise(path, root=root, pattern=pattern, ignore=ignore)
            if checkpoint is not None:
                yield FileEvent(kind, path, checkpoint)


class CheckpointWatcher:
    """Watches `root` and feeds `events`; a context manager around the observer.

    Enter starts the observer, then `scan()` feeds the files already there. Starting the
    observer first leaves no gap for a file written in between; seeing a file twice is
    harmless, since the daemon tracks checkpoints by path.
    """

    def __init__(
        self,
        root: Path,
        events: queue.Queue[FileEvent],
        *,
        pattern: re.Pattern[str] | None = None,
        ignore: tuple[Path, ...] = (),
        use_polling: bool = False,
        polling_interval_seconds: float = POLLING_INTERVAL_SECONDS,
    ) -> None:
        self.root = Path(root)
        self.events = events
        self.pattern = pattern
        self.ignore = ignore
        self.use_polling = use_polling
        self.polling_interval_seconds = polling_interval_seconds
        self.handler = CheckpointEventHandler(
            events, root=self.root, pattern=pattern, ignore=ignore, on_folder=self.watch_tree
        )
        self._observer: BaseObserver | None = None
        self._watches: dict[Path, ObservedWatch] = {}

    def __enter__(self) -> CheckpointWatcher:
        self.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.stop()

    def start(self) -> None:
        """Start watching; `root` must exist."""
        if not self.root.is_dir():
            raise FileNotFoundError(f"cannot watch {self.root}: no such folder")
        observer: BaseObserver = (
            PollingObserver(timeout=self.polling_interval_seconds) if self.use_polling else Observer()
        )
        observer.daemon = True  # never keeps the process alive on its own
        self._observer = observer
        if self.use_polling:
            observer.schedule(self.handler, str(self.root), recursive=True)
        else:
            self.watch_tree(self.root)
        observer.start()
        logger.info(
            "watching %s (%s)",
            self.root,
            f"polling every {self.polling_interval_seconds:g} s" if self.use_polling else "filesystem events",
        )

    def watch_tree(self, folder: Path) -> None:
        """Watch `folder` and the folders below it that can hold checkpoints, one level each.

        Not one recursive watch: the samples folder (sidecar's own atomic renames) and
        hidden ones (`.sidecar`) stay unwatched, because watchdog's inotify holds each
        rename at the head of its queue for 0.5 s, which would delay the trainer's next
        checkpoint behind sidecar's own writes. Called again for each new folder.
        """
        observer = self._observer
        if observer is None or self.use_polling:
            return
        for current, folders, _ in os.walk(folder):
            folders[:] = [name for name in folders if not is_excluded_folder(name)]
            path = Path(current)
            old = self._watches.pop(path, None)
            if old is not None:  # a folder made again under the same name: its old watch is dead
                with contextlib.suppress(KeyError):
                    observer.unschedule(old)
            try:
                self._watches[path] = observer.schedule(self.handler, str(path), recursive=False)
            except OSError as error:  # gone already (pruned), or the inotify watch limit
                logger.debug("cannot watch %s: %s", path, error)

    def stop(self) -> None:
        """Stop the observer thread and wait for it (bounded)."""
        observer, self._observer = self._observer, None
        if observer is None:
            return
        logging.getLogger("watchdog.observers.inotify").addFilter(_STOP_RACE_FILTER)
        observer.stop()
        observer.join(timeout=OBSERVER_JOIN_SECONDS)

    def problem(self) -> str | None:
        """Why the watcher sees nothing any more (its handler failed, a thread died); None while well."""
        if self.handler.failure is not None:
            failure = self.handler.failure
            return f"the file-event handler failed: {type(failure).__name__}: {failure}"
        observer = self._observer
        if observer is None:
            return None
        if not observer.is_alive():
            return "the observer thread died"
        if any(not emitter.is_alive() for emitter in observer.emitters):
            return "an event emitter thread died"
        return None

    def restart(self) -> None:
        """A fresh observer, then a rescan: whatever the dead one missed is seen now."""
        with contextlib.suppress(Exception):
            self.stop()
        self._watches.clear()
        self.handler.failure = None
        self.start()
        self.scan()

    def scan(self) -> int:
        """Feed every checkpoint already under `root` in (the startup scan); returns how many."""
        count = 0
        for event in scan_tree(self.root, root=self.root, pattern=self.pattern, ignore=self.ignore):
            self.events.put(event)
            count += 1
        logger.info("startup scan of %s: %s checkpoint file(s)", self.root, count)
        return count
