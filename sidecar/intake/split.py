"""ai-toolkit's split Wan 2.2 checkpoints: two files per step, taken in as one checkpoint.

ai-toolkit saves a Wan 2.2 A14B LoRA as `{name}_{step:09d}_high_noise.safetensors` and, right
after in the same process, `..._low_noise.safetensors`; a run training one expert writes only
that expert's file, ever. Both parts of a step are one checkpoint: one job, rendered once
with both experts (the renderer finds the sibling beside the file it is given). So:

- The store records a split checkpoint under one of its files (`recorded_as`): the part
  already tracked or recorded, else the high-noise file when it is there, else the
  low-noise one. Its other part rides along: read for readiness (`files_of`), copied into
  the same cache folder, hashed into its content, summed into its size.
- Readiness (`sidecar.intake.readiness`): the parts present are whole and settled, and
  either both are there or the one present has been alone for `SIBLING_GRACE_SECONDS`,
  counted from its last write (its mtime) or from when it was first seen alone, whichever is
  earlier: a file found long after it was written does not wait again.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

from sidecar.intake.layouts import Checkpoint
from sidecar.weights import split_sibling

# ai-toolkit saves the low-noise file right after the high-noise one (the state dict is split
# before either is saved; only the low file's serialisation comes between), so a lone part
# this long after its last write has no sibling coming: its run trains one expert. A run that
# has shown a pair waits longer (the tracker's `abandon_seconds`) before a lone part goes alone.
SIBLING_GRACE_SECONDS = 10.0


def file_signature(path: Path) -> tuple[int, int] | None:
    """(size, mtime_ns) of a file, or None when it cannot be seen."""
    try:
        stat = Path(path).stat()
    except OSError:
        return None
    return stat.st_size, stat.st_mtime_ns


def _present(path: Path) -> bool:
    """Whether a directory entry is there, a dangling symlink too: one is the trust check's to
    refuse (a sibling that is a link out of the folder must not be left out silently)."""
    try:
        Path(path).lstat()
    except OSError:
        return False
    return True


def sibling_of(checkpoint: Checkpoint) -> Checkpoint | None:
    """The other part of a split checkpoint (its file there or not); None for any other checkpoint."""
    if checkpoint.split is None:
        return None
    path = split_sibling(checkpoint.path)
    if path is None:
        return None
    other = "low_noise" if checkpoint.split == "high_noise" else "high_noise"
    return dataclasses.replace(checkpoint, path=path, split=other)


def files_of(checkpoint: Checkpoint) -> tuple[Path, ...]:
    """The files of `checkpoint` now: its own, then its sibling's when that is there."""
    sibling = sibling_of(checkpoint)
    if sibling is None or not _present(sibling.path):
        return (checkpoint.path,)
    return checkpoint.path, sibling.path


def recorded_as(checkpoint: Checkpoint, *, taken: Callable[[Path], bool]) -> Checkpoint:
    """The checkpoint a split part belongs to, named by the file the store records it under.

    `taken(path)`: whether a file is already tracked or recorded. A part joins a sibling already
    taken; otherwise the high-noise file names the checkpoint when it is there (ai-toolkit writes
    it first), else the low-noise one. Any other checkpoint is returned as it is.
    """
    sibling = sibling_of(checkpoint)
    if sibling is None or taken(checkpoint.path):
        return checkpoint
    if taken(sibling.path):
        return sibling
    if checkpoint.split == "low_noise" and _present(sibling.path):
        return sibling
    return checkpoint


def files_signature(checkpoint: Checkpoint) -> tuple[int, int] | None:
    """(total size, newest mtime_ns) of the checkpoint's files, as the store records a copy of
    them; None when its own file cannot be seen. A rewrite of either part changes it."""
    signatures = [file_signature(path) for path in files_of(checkpoint)]
    if signatures[0] is None:
        return None
    present = [signature for signature in signatures if signature is not None]
    return sum(size for size, _ in present), max(mtime for _, mtime in present)
