"""Locks on the samples folder: one daemon per folder, and a store owner's liveness.

Both are `flock`s on files in `.sidecar/`: the kernel drops them when the process dies,
even by `kill -9`, so a lock that can be taken again belongs to nobody.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

from sidecar.confined import ConfinedFolder
from sidecar.errors import SidecarError

try:  # POSIX advisory locks tell a live owner from a dead one; elsewhere, pids do
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]


class OwnerLock:
    """A lock file held for a store's lifetime; free once its process is gone (even `kill -9`).

    The lock files live in a folder sidecar owns; they are made, opened and deleted inside it
    (`ConfinedFolder`), never through a symlink.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.token = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
        self._dir = ConfinedFolder.own(folder)
        self.name = f"{self.token}.lock"
        self.path = folder / self.name
        self._fd: int | None = self._dir.open_file(self.name, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        if fcntl is not None:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)

    def release(self) -> None:
        if self._fd is None:
            return
        os.close(self._fd)  # closing drops the flock
        self._fd = None
        self._dir.unlink(self.name)
        self._dir.close()

    @staticmethod
    def is_alive(folder: Path, token: str) -> bool:
        name = f"{token}.lock"
        if fcntl is None:  # pragma: no cover - Windows: fall back to the pid in the token
            try:
                os.kill(int(token.split("-", 1)[0]), 0)
            except (OSError, ValueError):
                return False
            return True
        with ConfinedFolder.own(folder) as owners:
            try:
                descriptor = owners.open_file(name, os.O_RDWR)  # no O_CREAT: missing means a dead owner
            except FileNotFoundError:
                return False
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            finally:
                os.close(descriptor)  # also drops the lock we may have taken
            owners.unlink(name)
        return False


@contextlib.contextmanager
def process_lock(path: Path, *, what: str) -> Iterator[None]:
    """Hold `path` (e.g. `.sidecar/daemon.lock`) while running; a second holder is refused.

    `what` names the folder the lock guards, for the message. The lock file is opened
    inside its folder without following a symlink, and never truncated before it is held.
    """
    with ConfinedFolder.own(path.parent) as folder:
        descriptor = folder.open_file(path.name, os.O_RDWR | os.O_CREAT)
    with os.fdopen(descriptor, "r+") as handle:
        if fcntl is not None:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                owner = handle.read().strip() or "?"
                raise SidecarError(
                    f"another sidecar daemon (pid {owner}) is already rendering into {what}; "
                    "stop it first, or give this one another `--output`"
                ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        yield
