"""Which files in the trainer's folder sidecar reads: by default, only those that really lie in it.

A checkpoint may be a symlink. Followed blindly, a link planted in the watched folder
(`lora_000000100.safetensors -> /root/.ssh/id_rsa`) would be copied into the samples
folder, or its bytes shown in an error. So by default a file is read only when its
real path lies inside the watched folder; `--follow-symlinks` (setting
`follow_symlinks`) lifts that for people who link storage in. The check is made on
the file actually opened (`/proc/self/fd`), so a link swapped in after the check is
caught too.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from sidecar.errors import CheckpointError

PROC_FD = Path("/proc/self/fd")  # Linux: the path of an open descriptor


class OutsideWatchedFolder(CheckpointError):
    """A checkpoint whose real path lies outside the watched folder (a symlink out of it)."""


def is_within(path: Path, root: Path) -> bool:
    """Whether `path` (a real path) is `root` (a real path) or below it."""
    return path == root or root in path.parents


def outside_reason(path: Path, real: Path, root: Path) -> str:
    return (
        f"{path} is a symlink to {real}, outside the watched folder {root}; sidecar reads only files "
        "inside it (`--follow-symlinks` reads linked files too)"
    )


def check_inside(path: Path, root: Path) -> None:
    """Raise `OutsideWatchedFolder` when `path`'s real path is not inside `root`."""
    real, real_root = Path(os.path.realpath(path)), Path(os.path.realpath(root))
    if not is_within(real, real_root):
        raise OutsideWatchedFolder(outside_reason(path, real, real_root))


@contextlib.contextmanager
def open_checkpoint(path: Path, *, root: Path | None) -> Iterator[BinaryIO]:
    """`path` opened for reading; with `root`, only when the file opened lies inside it.

    None for `root` follows symlinks anywhere (`follow_symlinks`).
    """
    with Path(path).open("rb") as handle:
        if root is not None:
            opened = PROC_FD / str(handle.fileno())
            real = Path(os.readlink(opened)) if opened.is_symlink() else Path(os.path.realpath(path))
            real_root = Path(os.path.realpath(root))
            if not is_within(real, real_root):
                raise OutsideWatchedFolder(outside_reason(path, real, real_root))
        yield handle
