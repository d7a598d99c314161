"""File operations confined to one folder: never through a symlink, never outside it.

The samples folder sits where the trainer (or anyone who can write there) can plant
entries. With `.sidecar/cache` a symlink to another folder, a clean-up by path would
empty that folder; a `step_000500` symlink would put images (or replace files) there.
So everything sidecar writes, truncates or deletes under the samples folder goes
through a `ConfinedFolder`: a directory file descriptor opened without following a
symlink (`O_NOFOLLOW | O_DIRECTORY`), and operations relative to it (`openat`,
`mkdirat`, `renameat`, `unlinkat` through Python's `dir_fd`). No component can be
swapped for a symlink between a check and its use, and an entry that is a symlink or
the wrong kind of file is an `UnsafeEntryError` naming it, never followed.

Python's `shutil.rmtree` follows no symlink either, but takes `dir_fd` only from 3.11
and deletes a folder named by path; `remove_tree` here works inside an open folder.
POSIX only (`dir_fd`, `O_NOFOLLOW`), as the daemon is.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import IO, Literal

from sidecar.errors import SidecarError

NOFOLLOW = os.O_NOFOLLOW
DIRECTORY_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
NEW_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
FILE_MODE = 0o666  # less the umask, as `open()` would: a web server may serve the samples
FOLDER_MODE = 0o777  # less the umask
TEMP_SUFFIX = ".tmp"

Kind = Literal["file", "folder", "symlink", "other"]


class UnsafeEntryError(SidecarError):
    """An entry sidecar writes to is a symlink, or not the kind of file it must be.

    Never followed or replaced: something other than sidecar put it there.
    """


def kind_of(mode: int) -> Kind:
    """What an `lstat` mode says the entry is."""
    if stat.S_ISLNK(mode):
        return "symlink"
    if stat.S_ISDIR(mode):
        return "folder"
    if stat.S_ISREG(mode):
        return "file"
    return "other"


def unsafe(path: Path, found: Kind, wanted: Kind) -> UnsafeEntryError:
    """The error for `path`, found to be `found` where sidecar needs a `wanted`."""
    if found == "symlink":
        try:
            target = f" (to {os.readlink(path)})"
        except OSError:
            target = ""
        problem = f"is a symbolic link{target}"
    else:
        problem = f"is a {found}, not a {wanted}"
    return UnsafeEntryError(
        f"`{path}` {problem}; sidecar never writes or deletes through a link, nor outside its samples "
        "folder. Something other than sidecar put it there: remove it (sidecar makes it again), "
        "or choose another samples folder with `--output`"
    )


def _not_plain(path: Path, found: os.stat_result) -> UnsafeEntryError | None:
    """Why a file written in place is unsafe, or None: it must be a plain file with one link
    (writing a hard link would change the file it was made from, wherever that lies)."""
    kind = kind_of(found.st_mode)
    if kind != "file":
        return unsafe(path, kind, "file")
    if found.st_nlink > 1:
        return UnsafeEntryError(
            f"`{path}` has {found.st_nlink} hard links; sidecar writes it in place and would change the "
            "other files too. Something other than sidecar made them: remove it"
        )
    return None


def temp_name(name: str) -> str:
    """A hidden temp name for `name` in its folder: `.name.<hex>.tmp`."""
    return f".{_check_name(name)}.{secrets.token_hex(6)}{TEMP_SUFFIX}"


def _check_name(name: str) -> str:
    if not name or name in (".", "..") or "/" in name or "\0" in name:
        raise ValueError(f"`name` must be one path component, got {name!r}")
    return name


class ConfinedFolder:
    """An open folder; every operation stays inside it and follows no symlink.

    Use as a context manager, or call `close`. `path` is for messages and for readers
    that take a path; writes never go through it.
    """

    def __init__(self, fd: int, path: Path) -> None:
        self.fd = fd
        self.path = Path(path)

    # --- opening ---------------------------------------------------------------------

    @classmethod
    def open(cls, path: Path, *, create: bool = False) -> ConfinedFolder:
        """Open `path` itself, as named (the user chose it; symlinks in it are followed).

        `create` makes it, with its parents, when missing.
        """
        path = Path(path)
        if create:
            path.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        return cls(fd, path)

    @classmethod
    def own(cls, path: Path, *, create: bool = True) -> ConfinedFolder:
        """Open a folder sidecar owns (`.sidecar`, `cache`): its parent as named, the folder itself
        without following a symlink. A symlink or a file there is an `UnsafeEntryError`."""
        path = Path(path)
        with cls.open(path.parent, create=create) as parent:
            return parent.folder(path.name, create=create)

    def folder(self, name: str, *, create: bool = True) -> ConfinedFolder:
        """The sub-folder `name`, made when missing (`create`); never a symlink."""
        _check_name(name)
        path = self.path / name
        if create:
            with contextlib.suppress(FileExistsError):
                os.mkdir(name, FOLDER_MODE, dir_fd=self.fd)
        try:
            fd = os.open(name, DIRECTORY_FLAGS, dir_fd=self.fd)
        except OSError as error:
            if error.errno in (errno.ELOOP, errno.ENOTDIR):
                raise unsafe(path, self.kind(name) or "other", "folder") from None
            raise
        return ConfinedFolder(fd, path)

    def folders(self, parts: tuple[str, ...], *, create: bool = True) -> ConfinedFolder:
        """The folder `parts` below this one (e.g. `("step_000500",)`), each part a real folder."""
        current = ConfinedFolder(os.dup(self.fd), self.path)
        for part in parts:
            with current:
                current = current.folder(part, create=create)
        return current

    # --- looking ----------------------------------------------------------------------

    def kind(self, name: str) -> Kind | None:
        """What `name` is here (never following it); None when there is nothing."""
        try:
            mode = os.stat(_check_name(name), dir_fd=self.fd, follow_symlinks=False).st_mode
        except FileNotFoundError:
            return None
        return kind_of(mode)

    def entries(self) -> list[str]:
        """The names in this folder, sorted."""
        return sorted(os.listdir(self.fd))

    def require(self, name: str, wanted: Kind) -> bool:
        """Whether `name` exists; an `UnsafeEntryError` when it is something else than `wanted`."""
        found = self.kind(name)
        if found is not None and found != wanted:
            raise unsafe(self.path / name, found, wanted)
        return found is not None

    # --- writing ----------------------------------------------------------------------

    def open_file(self, name: str, flags: int, mode: int = FILE_MODE) -> int:
        """`os.open` of `name` here, never through a symlink; a raw descriptor the caller closes.

        The file opened must be a plain file with no other hard link: one written in place (a
        lock, a store) would otherwise change the file the link was made from, wherever it lies.
        """
        try:
            fd = os.open(_check_name(name), flags | NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=self.fd)
        except OSError as error:
            if error.errno in (errno.ELOOP, errno.EISDIR):
                found = "symlink" if error.errno == errno.ELOOP else "folder"
                raise unsafe(self.path / name, found, "file") from None
            raise
        problem = _not_plain(self.path / name, os.fstat(fd))
        if problem is not None:
            os.close(fd)
            raise problem
        return fd

    def require_plain_file(self, name: str) -> bool:
        """Whether `name` exists; an `UnsafeEntryError` unless it is a plain file with one link.

        For files another library opens by path (SQLite's store, journal and shared memory):
        checked here, just before that library opens them.
        """
        try:
            found = os.stat(_check_name(name), dir_fd=self.fd, follow_symlinks=False)
        except FileNotFoundError:
            return False
        problem = _not_plain(self.path / name, found)
        if problem is not None:
            raise problem
        return True

    def new_temp_file(self, name: str) -> tuple[str, int]:
        """A new hidden temp file named after `name` (`.name.<hex>.tmp`): its name and descriptor."""
        temp = temp_name(name)
        return temp, os.open(temp, NEW_FILE_FLAGS, FILE_MODE, dir_fd=self.fd)

    def read_bytes(self, name: str) -> bytes:
        """The content of the file `name` here, never through a symlink."""
        fd = os.open(_check_name(name), os.O_RDONLY | NOFOLLOW | os.O_CLOEXEC, dir_fd=self.fd)
        with os.fdopen(fd, "rb") as handle:
            return handle.read()

    def write_atomic(self, name: str, write: Callable[[IO[bytes]], None], *, durable: bool = True) -> None:
        """Write `name` through a temp file here, then rename it into place; nothing half-written.

        `durable` fsyncs the file and the folder (samples); a cache that is made again when lost
        skips that. A symlink at `name` is replaced by the file, never written through.
        """
        temp, fd = self.new_temp_file(name)
        try:
            with os.fdopen(fd, "wb") as handle:
                write(handle)
                handle.flush()
                if durable:
                    os.fsync(handle.fileno())
            self.replace(temp, name)
        except BaseException:
            self.unlink(temp)
            raise
        if durable:
            with contextlib.suppress(OSError):
                os.fsync(self.fd)

    def replace(self, source: str, target: str, *, into: ConfinedFolder | None = None) -> None:
        """Rename `source` here to `target` here (or in the folder `into`), replacing it."""
        destination = self if into is None else into
        os.replace(_check_name(source), _check_name(target), src_dir_fd=self.fd, dst_dir_fd=destination.fd)

    def link_atomic(self, source: ConfinedFolder, source_name: str, name: str) -> None:
        """`name` here becomes a hard link of the file `source_name` in `source`, replacing what
        was there in one rename. A symlink at `source_name` is refused, never linked."""
        if source.kind(source_name) != "file":
            raise unsafe(source.path / source_name, source.kind(source_name) or "other", "file")
        temp = temp_name(name)
        os.link(
            _check_name(source_name), temp, src_dir_fd=source.fd, dst_dir_fd=self.fd, follow_symlinks=False
        )
        try:
            self.replace(temp, name)
        except BaseException:
            self.unlink(temp)
            raise

    def unlink(self, name: str) -> bool:
        """Delete the file (or symlink itself) `name`; False when it was not there."""
        try:
            os.unlink(_check_name(name), dir_fd=self.fd)
        except FileNotFoundError:
            return False
        return True

    def remove_tree(self, name: str) -> None:
        """Delete `name` and everything below it; a symlink is removed itself, never followed."""
        found = self.kind(name)
        if found is None:
            return
        if found != "folder":
            self.unlink(name)
            return
        with self.folder(name, create=False) as child:
            for entry in child.entries():
                child.remove_tree(entry)
        with contextlib.suppress(FileNotFoundError):
            os.rmdir(name, dir_fd=self.fd)

    # --- closing ----------------------------------------------------------------------

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> ConfinedFolder:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close()

    def __del__(self) -> None:  # a folder left open by an error path must not leak its descriptor
        with contextlib.suppress(Exception):
            self.close()
