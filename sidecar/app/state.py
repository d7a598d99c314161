"""The daemon's state file, `.sidecar/daemon.json`: what it is doing now, for `sidecar status`.

Written atomically whenever what the daemon does changes (rendering, idle, waiting for a
slot); read without torch or the watcher, so `sidecar status` stays instant.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sidecar.confined import ConfinedFolder, Kind, UnsafeEntryError
from sidecar.jobs.store import OWNERS_SUFFIX, STORE_FILE_SUFFIXES
from sidecar.publish.gallery import THUMBS_DIR
from sidecar.settings import (
    CACHE_DIR_NAME,
    JOBS_FILE_NAME,
    LOCK_FILE_NAME,
    STATE_DIR_NAME,
    STATE_FILE_NAME,
    SamplesFolder,
)

logger = logging.getLogger("sidecar.app")

MAX_STATE_FILE_BYTES = 4 * 1024 * 1024  # far more than the daemon writes; a planted huge file is cut
WAITING_WRITE_SECONDS = 1.0  # the waiting list's reasons are written at most this often
# What `.sidecar/` holds, and what each entry must be: nothing there is ever followed.
STATE_ENTRIES: dict[str, Kind] = {
    **{JOBS_FILE_NAME + suffix: "file" for suffix in STORE_FILE_SUFFIXES},
    JOBS_FILE_NAME + OWNERS_SUFFIX: "folder",
    STATE_FILE_NAME: "file",
    LOCK_FILE_NAME: "file",
    CACHE_DIR_NAME: "folder",
}


def write_state_file(samples_dir: Path, content: dict[str, Any]) -> None:
    """`.sidecar/daemon.json`, replaced atomically inside `.sidecar` (never through a symlink).

    A `.sidecar` that is a symlink or a file is an `UnsafeEntryError`: the daemon stops.
    """
    folder = SamplesFolder(Path(samples_dir))
    data = json.dumps(content).encode("utf-8")
    try:
        with ConfinedFolder.own(folder.state) as state:
            state.write_atomic(STATE_FILE_NAME, lambda handle: handle.write(data), durable=False)
    except UnsafeEntryError:
        raise
    except OSError as error:  # status is a convenience; never stop rendering for it
        logger.debug("cannot write %s: %s", folder.state_file, error)


def read_state_file(samples_dir: Path) -> dict[str, Any] | None:
    """What the daemon last wrote about itself, or None (also for a symlink: never followed)."""
    try:
        fd = os.open(SamplesFolder(Path(samples_dir)).state_file, os.O_RDONLY | os.O_NOFOLLOW)
        with os.fdopen(fd, "rb") as handle:
            state = json.loads(handle.read(MAX_STATE_FILE_BYTES).decode("utf-8"))
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) else None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def running_daemon_pid(samples_dir: Path) -> int | None:
    """The pid of the daemon serving `samples_dir` while it runs, else None."""
    state = read_state_file(samples_dir)
    if state is None or state.get("state") == "stopped":
        return None
    pid = int(state.get("pid", 0) or 0)
    return pid if pid and _pid_alive(pid) else None


class StateFile:
    """The daemon's side: record what it does, writing only when that changes.

    Beside its state, the daemon records the files it has seen that are not ready yet, with
    why (`set_waiting`), so `sidecar status` can list them.
    """

    def __init__(self, samples_dir: Path) -> None:
        self.samples_dir = Path(samples_dir)
        self.text = ""
        self.since = 0.0
        self.waiting: list[tuple[str, str]] = []
        self._waiting_written_at = 0.0

    def set(self, text: str) -> None:
        if text == self.text:
            return
        self.text, self.since = text, time.time()
        self._write()

    def set_waiting(self, waiting: Sequence[tuple[Path, str]], now: float) -> None:
        """The files not ready yet and why; written when the files change, or their reasons
        change and `WAITING_WRITE_SECONDS` have passed (a settling file's reason changes at every look)."""
        entries = [(str(path), reason) for path, reason in waiting]
        if entries == self.waiting:
            return
        same_files = [path for path, _ in entries] == [path for path, _ in self.waiting]
        if same_files and now - self._waiting_written_at < WAITING_WRITE_SECONDS:
            return
        self.waiting, self._waiting_written_at = entries, now
        self._write()

    def _write(self) -> None:
        content = {"pid": os.getpid(), "state": self.text, "since": self.since}
        if self.waiting:
            content["waiting"] = [{"path": path, "reason": reason} for path, reason in self.waiting]
        write_state_file(self.samples_dir, content)


def check_samples_folder(folder: SamplesFolder, *, inside: Path | None) -> None:
    """Refuse, before anything is written, a samples folder whose own entries are not what sidecar
    made: `.sidecar` or an entry in it that is a symlink, a hard link or of the wrong kind.

    `inside`: the trainer's run folder, where the samples folder is its default `samples/`;
    there it must be a real folder too (a link would send every write elsewhere). A folder
    the user named (`--output`) is used as named. Raises `UnsafeEntryError` saying which entry.
    """
    if inside is not None:
        with ConfinedFolder.open(inside, create=True) as run:
            run.folder(folder.root.name).close()
    with ConfinedFolder.open(folder.root, create=True) as root:
        root.require(THUMBS_DIR, "folder")
        with root.folder(STATE_DIR_NAME) as state:
            for name, kind in STATE_ENTRIES.items():
                if kind == "file":
                    state.require_plain_file(name)
                else:
                    state.require(name, kind)
