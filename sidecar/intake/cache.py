"""The checkpoint cache: a private copy of each whole checkpoint, taken before the trainer prunes it.

Trainers delete old checkpoints (ai-toolkit `max_step_saves_to_keep`), possibly before
sidecar gets to render them, so a checkpoint is copied the moment it is whole and
rendered from the copy. LoRA files are small next to a base model, and a copy (unlike an
open handle) survives a restart. The copy is hashed as it is made: its SHA-256 names
its folder (`cache/<sha256>/<name>`) and is the job store's identity of the content.

A copy is checked against the file's size and mtime before and after copying: a
trainer rewriting the file meanwhile raises `ChangedWhileCopying`, and the caller sends
it back to the readiness tracker.

A split Wan 2.2 checkpoint (`sidecar.intake.split`) is copied with its sibling, each under
its own name, into one folder, where the renderer finds the pair; its content hash is the
SHA-256 of the files' hashes in name order, so equal pairs at two steps are equal content.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from sidecar.confined import ConfinedFolder
from sidecar.errors import SidecarError
from sidecar.intake.readiness import completeness
from sidecar.intake.trust import open_checkpoint

COPY_CHUNK_BYTES = 4 * 1024 * 1024
PARTIAL_SUFFIX = ".partial"


class ChangedWhileCopying(Exception):
    """The trainer rewrote the file while it was being copied: it is not ready after all."""


@dataclass(frozen=True)
class CachedCopy:
    """A whole checkpoint, copied aside."""

    path: Path  # the copy
    content_hash: str
    size_bytes: int  # of every file copied
    mtime_ns: int  # of the original (the newest of its files), when it was copied


def content_hash(path: Path, *, chunk_bytes: int = COPY_CHUNK_BYTES) -> str:
    """SHA-256 of the file, streamed: the job store's identity of a checkpoint's content."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def combined_hash(hashes: Iterable[str]) -> str:
    """The content hash of a checkpoint of several files, from their hashes in name order."""
    return hashlib.sha256("\n".join(hashes).encode()).hexdigest()


def unusable_fingerprint(path: Path, *siblings: Path) -> tuple[str, int, int] | None:
    """(identity, size, mtime_ns) of a checkpoint that can never render; None when `path` is gone.

    A hash of its path and bytes (and those of a split checkpoint's `siblings`, summed into the
    size, the newest mtime): two empty or truncated files must not be taken for one. Size and
    mtime are -1 when a file cannot be read; a sibling gone meanwhile is left out.
    """
    digest = hashlib.sha256(f"unusable\0{path}\0".encode())
    size, mtime_ns = 0, 0
    for number, file in enumerate((path, *siblings)):
        try:
            with Path(file).open("rb") as handle:
                stat = os.fstat(handle.fileno())
                digest.update(f"\0{Path(file).name}\0".encode() if number else b"")
                while chunk := handle.read(COPY_CHUNK_BYTES):
                    digest.update(chunk)
        except FileNotFoundError:
            if number == 0:
                return None
            continue
        except OSError:
            return digest.hexdigest(), -1, -1
        size, mtime_ns = size + stat.st_size, max(mtime_ns, stat.st_mtime_ns)
    return digest.hexdigest(), size, mtime_ns


class CheckpointCache:
    """`SAMPLES_DIR/.sidecar/cache`: copies of checkpoints that are not rendered yet.

    Every write and delete goes through the open folder (`ConfinedFolder`): a `cache`
    that is a symlink is refused, and nothing below it is ever followed.
    """

    def __init__(self, folder: Path | ConfinedFolder) -> None:
        self._dir = folder if isinstance(folder, ConfinedFolder) else ConfinedFolder.own(Path(folder))
        self.folder = self._dir.path

    def close(self) -> None:
        self._dir.close()

    def copy_in(
        self,
        path: Path,
        expected: tuple[int, int],
        *,
        root: Path | None = None,
        siblings: Mapping[Path, tuple[int, int]] | None = None,
    ) -> CachedCopy:
        """Copy `path` (and a split checkpoint's `siblings`) into `cache/<sha256>/<name>`, hashing
        as it goes.

        Each file must still be what the tracker judged whole (`expected` size and mtime)
        and must not change while it is copied; it may be deleted meanwhile (the open
        handle still reads it whole). With `root`, each file opened must lie inside it
        (`sidecar.intake.trust.open_checkpoint`). Raises `ChangedWhileCopying`,
        `OutsideWatchedFolder`, `FileNotFoundError` or another `OSError`, naming the file.
        """
        files = {Path(path): expected, **(siblings or {})}
        temporaries: dict[str, str] = {}  # file name -> its temporary copy's name
        copied: dict[str, tuple[str, int, int]] = {}  # file name -> (sha256, size, mtime_ns)
        try:
            for file, signature in files.items():
                temporary, target_fd = self._dir.new_temp_file(f"copy{PARTIAL_SUFFIX}")
                temporaries[file.name] = temporary
                copied[file.name] = self._copy(file, signature, temporary, target_fd, root)
            hashes = [copied[name][0] for name in sorted(copied)]
            digest = hashes[0] if len(hashes) == 1 else combined_hash(hashes)
            with self._dir.folder(digest) as folder:
                for name, temporary in temporaries.items():
                    self._dir.replace(temporary, name, into=folder)
        finally:
            for temporary in temporaries.values():
                self._dir.unlink(temporary)
        size = sum(size for _, size, _ in copied.values())
        newest = max(mtime_ns for _, _, mtime_ns in copied.values())
        return CachedCopy(self.folder / digest / Path(path).name, digest, size, newest)

    def _copy(
        self, path: Path, expected: tuple[int, int], temporary: str, target_fd: int, root: Path | None
    ) -> tuple[str, int, int]:
        """One file into its open temporary copy: (sha256, size, mtime_ns) once the copy is whole."""
        digest = hashlib.sha256()
        copied = 0
        with os.fdopen(target_fd, "wb") as target, open_checkpoint(path, root=root) as source:
            before = os.fstat(source.fileno())
            if (before.st_size, before.st_mtime_ns) != expected:
                raise ChangedWhileCopying(path)
            while chunk := source.read(COPY_CHUNK_BYTES):
                digest.update(chunk)
                target.write(chunk)
                copied += len(chunk)
            after = os.fstat(source.fileno())
        if copied != before.st_size or (after.st_size, after.st_mtime_ns) != expected:
            raise ChangedWhileCopying(path)
        if not completeness(self.folder / temporary).whole:
            raise ChangedWhileCopying(path)
        return digest.hexdigest(), before.st_size, before.st_mtime_ns

    def source_of(self, content_hash: str | None, original: Path) -> Path:
        """The cached copy of a checkpoint; the original file only if no copy exists."""
        if content_hash:
            folder = self.folder / content_hash
            preferred = folder / original.name
            if preferred.is_file():
                return preferred
            copies = sorted(folder.glob("*")) if folder.is_dir() else []
            if copies:
                return copies[0]
        if original.is_file():
            return original
        raise SidecarError(f"{original}: vanished, and no copy of it was kept (pruned by the trainer?)")

    def drop(self, content_hash: str) -> None:
        self._dir.remove_tree(content_hash)

    def clean(self, needed: Iterable[str]) -> None:
        """Drop copies no pending job needs, and partial copies a killed process left."""
        keep = set(needed)
        for name in self._dir.entries():
            if name not in keep:
                self._dir.remove_tree(name)
