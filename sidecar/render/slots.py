"""Time slots on a one-GPU box (`--share-gpu N`): render only while the trainer leaves the card.

A probe answers one question, "may a render start now?", from the outside world
(NVML's process list, a file, a lock); `SlotGate` turns those answers into
open/closed states with reasons and logs each transition. Time is always passed
in (`now`, seconds, any monotonic clock), nothing here sleeps, so the daemon's
loop and the tests drive it alike.

The daemon asks the gate before each image. While the slot is closed it parks the
pipeline (`sidecar.render.memory.Placement.park`) and holds no VRAM; a slot that closes during an
image does not stop that image, it is finished first, then the GPU is released.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from sidecar.errors import TransientError
from sidecar.render.nvml import DWELL_SECONDS, NvmlProbe, load_nvml, nvml_index_for_cuda, nvml_init
from sidecar.settings import SLOT_FILE_MODES, SlotFileMode

logger = logging.getLogger("sidecar.slots")


SLOT_POLL_SECONDS = 2.0  # how often the daemon should ask a closed gate again


class SlotClosedError(TransientError):
    """The slot closed between the check and the render (a lock was taken first)."""


@runtime_checkable
class SlotProbe(Protocol):
    """Tells whether a render may start now."""

    def is_open(self, now: float) -> bool:
        """Whether a render may start at time `now` (seconds, monotonic)."""
        ...

    def describe(self) -> str:
        """The state at the last `is_open`, for logs and `sidecar status`."""
        ...

    def hold(self) -> contextlib.AbstractContextManager[None]:
        """Keep the slot for the duration of one render (a no-op for probes that cannot)."""
        ...


class AlwaysOpen:
    """The dual-GPU case: the card is ours alone, so the slot never closes."""

    def __init__(self, label: str = "a GPU of its own") -> None:
        self.label = label

    def is_open(self, now: float) -> bool:
        return True

    def describe(self) -> str:
        return f"always open: rendering on {self.label}"

    def hold(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()


# ---------------------------------------------------------------------------------
# Files: a marker a trainer's hook creates or removes, or a lock it holds
# ---------------------------------------------------------------------------------


class FileProbe:
    """Open while a file exists (`exists`), while it does not (`absent`), or while a lock is free (`lock`).

    `exists` / `absent` suit a trainer hook or a pause switch that touches and removes
    a marker. `lock` uses `flock` on `path` (created if missing): the trainer holds it
    while it needs the GPU, e.g. `flock /run/sidecar/gpu0.lock python train.py`. The
    check takes the lock and lets it go at once; `hold()` keeps it for one render, so a
    trainer starting meanwhile waits for the image to finish rather than meeting a full
    card. Marker files cannot be held: a marker removed mid-image closes the slot only
    for the next image.
    """

    def __init__(self, path: str | Path, *, mode: SlotFileMode = "exists") -> None:
        if mode not in SLOT_FILE_MODES:
            raise ValueError(f"`mode` must be one of {', '.join(SLOT_FILE_MODES)}, got {mode!r}")
        self.path = Path(path)
        self.mode = mode
        self._held_fd: int | None = None
        self._state = "not checked yet"

    def is_open(self, now: float) -> bool:
        if self.mode == "lock":
            return self._lock_is_free()
        present = self.path.exists()
        is_open = present if self.mode == "exists" else not present
        state = "exists" if present else "does not exist"
        self._state = f"{'slot open' if is_open else 'waiting for a slot'}: {self.path} {state}"
        return is_open

    def _open_fd(self) -> int:
        return os.open(self.path, os.O_RDONLY | os.O_CREAT, 0o666)

    def _lock_is_free(self) -> bool:
        if self._held_fd is not None:
            self._state = f"slot open: sidecar holds the lock {self.path}"
            return True
        try:
            fd = self._open_fd()
        except OSError as exc:
            self._state = f"waiting for a slot: cannot open the lock {self.path} ({exc.strerror})"
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            self._state = f"waiting for a slot: another process holds the lock {self.path}"
            return False
        finally:
            os.close(fd)  # closing the descriptor also drops a lock taken through it
        self._state = f"slot open: the lock {self.path} is free"
        return True

    def describe(self) -> str:
        return self._state

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        """Keep the lock for one render; raises SlotClosedError if it was taken since the check."""
        if self.mode != "lock" or self._held_fd is not None:
            yield
            return
        fd = self._open_fd()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            raise SlotClosedError(f"the lock {self.path} was taken between the check and the render") from exc
        self._held_fd = fd
        try:
            yield
        finally:
            self._held_fd = None
            os.close(fd)


class AllOpen:
    """Open only while every probe is open (e.g. NVML and a pause file)."""

    def __init__(self, probes: Iterable[SlotProbe]) -> None:
        self.probes = tuple(probes)
        if not self.probes:
            raise ValueError("`probes` must not be empty")
        self._closed: SlotProbe | None = None

    def is_open(self, now: float) -> bool:
        self._closed = None
        for probe in self.probes:  # ask every probe, so each one's dwell clock runs
            if not probe.is_open(now) and self._closed is None:
                self._closed = probe
        return self._closed is None

    def describe(self) -> str:
        if self._closed is not None:
            return self._closed.describe()
        return "; ".join(probe.describe() for probe in self.probes)

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            for probe in self.probes:
                stack.enter_context(probe.hold())
            yield


# ---------------------------------------------------------------------------------
# The gate the daemon asks before each image
# ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class SlotState:
    """The gate's answer: may a render start, why, and whether that changed just now."""

    is_open: bool
    reason: str
    changed: bool


class SlotGate:
    """Asks a probe before each image and logs when the slot opens or closes."""

    def __init__(self, probe: SlotProbe) -> None:
        self.probe = probe
        self._open: bool | None = None
        self._since: float | None = None

    def wait_state(self, now: float, *, in_checkpoint: bool = False) -> SlotState:
        """Whether a render may start at `now`.

        `in_checkpoint` says some images of the current checkpoint are done and more
        are due; a slot closing then is logged as such, since that checkpoint's
        images will arrive in two parts.
        """
        is_open = self.probe.is_open(now)
        reason = self.probe.describe()
        changed = is_open != self._open
        if changed:
            if is_open:
                waited = (
                    "" if self._since is None or self._open is None else f" after {now - self._since:.0f} s"
                )
                logger.info("slot opened%s: %s", waited, reason)
            elif in_checkpoint:
                logger.info(
                    "slot closed mid-checkpoint: finishing the current image, then releasing the GPU (%s)",
                    reason,
                )
            elif self._open is None:
                logger.info("%s", reason)
            else:
                logger.info("slot closed: %s", reason)
            self._open = is_open
            self._since = now
        return SlotState(is_open=is_open, reason=reason, changed=changed)

    def status(self, now: float) -> str:
        """One line for `sidecar status`: the last state and how long it has lasted."""
        if self._open is None or self._since is None:
            return "slot not checked yet"
        return f"{self.probe.describe()} (for {now - self._since:.0f} s)"

    def hold(self) -> contextlib.AbstractContextManager[None]:
        """Keep the slot during one render (see the probe's `hold`)."""
        return self.probe.hold()

    @property
    def always_open(self) -> bool:
        """The card is sidecar's alone: no need to release it between renders."""
        return isinstance(self.probe, AlwaysOpen)


def build_probe(
    *,
    share_gpu: int | None,
    slot_file: str | Path | None = None,
    slot_file_mode: SlotFileMode = "exists",
    required_free_bytes: int | None = None,
    dwell_seconds: float = DWELL_SECONDS,
    nvml: Any = None,
    cuda_uuid: str | None = None,
) -> SlotProbe:
    """The probe for the command line's options: NVML for `--share-gpu N`, a file, both, or none.

    `share_gpu` is a CUDA index as torch counts it; it is mapped to NVML's index
    (see `nvml_index_for_cuda`; pass torch's UUID of the card as `cuda_uuid`).
    """
    probes: list[SlotProbe] = []
    if share_gpu is not None:
        nvml = nvml if nvml is not None else load_nvml()
        nvml_init(nvml)
        try:
            index = nvml_index_for_cuda(share_gpu, nvml=nvml, cuda_uuid=cuda_uuid)
        finally:
            nvml.nvmlShutdown()
        probe = NvmlProbe(
            index,
            required_free_bytes=required_free_bytes,
            dwell_seconds=dwell_seconds,
            nvml=nvml,
            label=f"cuda:{share_gpu}",
        )
        probes.append(probe)
    if slot_file is not None:
        probes.append(FileProbe(slot_file, mode=slot_file_mode))
    if not probes:
        return AlwaysOpen()
    return probes[0] if len(probes) == 1 else AllOpen(probes)
