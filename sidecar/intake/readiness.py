"""When a checkpoint a trainer writes in place is ready to read: whole, settled, marked.

Trainers write checkpoints in place (not by rename), so a file is ready only once it
is whole (its safetensors header parses and declares the file's exact size), its size
and mtime have not changed for `settle_seconds`, and its layout's marker file (if any)
exists. Time is passed in, so tests need no sleeps.
"""

from __future__ import annotations

import json
import logging
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from sidecar.intake.layouts import Checkpoint
from sidecar.settings import ABANDON_SECONDS, SETTLE_SECONDS
from sidecar.weights import HEADER_LENGTH_BYTES, MAX_HEADER_BYTES, HeaderError, is_pickle, parse_header

logger = logging.getLogger("sidecar.intake")


@dataclass(frozen=True)
class Completeness:
    """Whether a file is whole right now, and why not. Never an error by itself:
    a file still being written is simply not whole yet."""

    whole: bool
    reason: str
    size: int  # bytes; -1 when the file is gone
    mtime_ns: int  # -1 when the file is gone
    exists: bool = True
    corrupt: bool = False  # no further write can make it whole (a header that can never parse)


def _corrupt_for_sure(path: Path, size: int) -> bool:
    """Whether a header that did not parse never will: its length field is over the limit, or
    the whole header is there and is not a JSON object.

    Writers put the header first, so once its declared bytes are in the file they are final;
    a file still growing fails only for want of data, which is not corruption.
    """
    try:
        with path.open("rb") as handle:
            field = handle.read(HEADER_LENGTH_BYTES)
            if len(field) < HEADER_LENGTH_BYTES:
                return False
            (header_bytes,) = struct.unpack("<Q", field)
            if header_bytes > MAX_HEADER_BYTES:
                return True
            if HEADER_LENGTH_BYTES + header_bytes > size:
                return False
            parsed = json.loads(handle.read(header_bytes).decode("utf-8"))
    except OSError:
        return False
    except (UnicodeDecodeError, json.JSONDecodeError):
        return True
    return not isinstance(parsed, dict)


def completeness(path: Path) -> Completeness:
    """Whether `path` is a whole file now. Never raises for a short or half-written file.

    A safetensors file is whole when its header parses and 8 + header length + the
    largest data offset equals the file size. A pickle file cannot be checked that way;
    it counts as whole (the tracker still waits for it to settle) so that the daemon
    can record why it is refused.
    """
    try:
        stat = path.stat()
    except FileNotFoundError:
        return Completeness(False, "file is gone", -1, -1, exists=False)
    except OSError as exc:
        return Completeness(False, f"cannot stat: {exc}", -1, -1, exists=False)
    size, mtime_ns = stat.st_size, stat.st_mtime_ns
    if is_pickle(path):
        return Completeness(
            size > 0, "pickle file: only its size is checked" if size else "file is empty", size, mtime_ns
        )
    try:
        header = parse_header(path, size)
    except HeaderError as exc:
        return Completeness(False, str(exc), size, mtime_ns, corrupt=_corrupt_for_sure(path, size))
    except FileNotFoundError:
        return Completeness(False, "file is gone", -1, -1, exists=False)
    except OSError as exc:
        return Completeness(False, f"cannot read: {exc}", size, mtime_ns)
    expected = header.expected_file_bytes
    if expected != size:
        return Completeness(
            False, f"header and data declare {expected} bytes, file has {size}", size, mtime_ns
        )
    return Completeness(True, f"whole: {len(header.tensors)} tensors, {size} bytes", size, mtime_ns)


ReadyState = Literal["waiting", "ready", "abandoned", "vanished"]


@dataclass(frozen=True)
class ReadyEvent:
    """A final verdict on a tracked checkpoint; `poll` reports each one once."""

    checkpoint: Checkpoint
    state: ReadyState  # never "waiting"
    reason: str
    size: int
    mtime_ns: int


@dataclass
class _Tracked:
    checkpoint: Checkpoint
    signature: tuple[int, int] | None = None  # (size, mtime_ns) last seen
    unchanged_since: float = 0.0
    last: Completeness | None = None
    reason: str = "not looked at yet"
    just_closed: bool = False  # a close (or rename into place) event came; not yet looked at
    closed_signature: tuple[int, int] | None = None  # (size, mtime_ns) when its writer closed it


class ReadinessTracker:
    """Decides when a checkpoint a trainer is writing in place is ready to read.

    Ready: the file is whole (`completeness`), its layout's marker file exists, and either
    its writer has just closed it (or renamed it into place: `observe(..., closed=True)`,
    inotify's `IN_CLOSE_WRITE` / `IN_MOVED_TO`) with nothing changed since, or its (size,
    mtime_ns) has not changed for `settle_seconds`. The settle wait is the fallback where no
    close event comes (polling, network filesystems) and for writers that close a file
    before it is whole. Abandoned: corrupt for sure (a header that can never parse) once
    settled or closed, or unchanged for `abandon_seconds` but still not whole (truncated
    for good) or still without its marker. Vanished: gone before it was ready. Time is
    passed in, so tests need no sleeps.
    """

    def __init__(
        self, *, settle_seconds: float = SETTLE_SECONDS, abandon_seconds: float = ABANDON_SECONDS
    ) -> None:
        if settle_seconds < 0 or abandon_seconds <= settle_seconds:
            raise ValueError(
                f"`abandon_seconds` must exceed `settle_seconds` >= 0, got {abandon_seconds} and"
                f" {settle_seconds}"
            )
        self.settle_seconds = settle_seconds
        self.abandon_seconds = abandon_seconds
        self._tracked: dict[Path, _Tracked] = {}

    def __len__(self) -> int:
        return len(self._tracked)

    @property
    def paths(self) -> list[Path]:
        """Paths still waiting for a verdict."""
        return list(self._tracked)

    def waiting(self) -> list[tuple[Path, str]]:
        """Every file still waiting for a verdict, with why it is not ready yet, by path."""
        return sorted((path, tracked.reason) for path, tracked in self._tracked.items())

    def observe(self, checkpoint: Checkpoint, now: float, *, closed: bool = False) -> ReadyState:
        """Start or continue tracking `checkpoint` (call on every file event) and say where it stands.

        `closed`: the event says its writer closed the file, or renamed it into place.
        The verdict itself is delivered by `poll`, once; this return value is informative.
        """
        tracked = self._tracked.get(checkpoint.path)
        if tracked is None:
            tracked = _Tracked(checkpoint, unchanged_since=now)
            self._tracked[checkpoint.path] = tracked
            logger.debug("tracking %s", checkpoint.path)
        tracked.just_closed = tracked.just_closed or closed
        return self._evaluate(tracked, now)[0]

    def forget(self, path: Path) -> None:
        """Stop tracking `path` without a verdict."""
        self._tracked.pop(path, None)

    def poll(self, now: float) -> list[ReadyEvent]:
        """Verdicts reached by `now`, each reported once; those paths are no longer tracked."""
        events: list[ReadyEvent] = []
        for path, tracked in list(self._tracked.items()):
            state, reason = self._evaluate(tracked, now)
            if state == "waiting":
                continue
            del self._tracked[path]
            last = tracked.last
            size, mtime_ns = (last.size, last.mtime_ns) if last is not None else (-1, -1)
            events.append(ReadyEvent(tracked.checkpoint, state, reason, size, mtime_ns))
            log = logger.info if state == "ready" else logger.warning
            log("%s %s: %s", path, state, reason)
        return events

    def _evaluate(self, tracked: _Tracked, now: float) -> tuple[ReadyState, str]:
        state, reason = self._verdict(tracked, now)
        tracked.reason = reason
        return state, reason

    def _verdict(self, tracked: _Tracked, now: float) -> tuple[ReadyState, str]:
        check = completeness(tracked.checkpoint.path)
        tracked.last = check
        if not check.exists:
            return "vanished", "vanished before it could be read (pruned or deleted by the trainer?)"
        signature = (check.size, check.mtime_ns)
        if signature != tracked.signature:
            tracked.signature = signature
            tracked.unchanged_since = now
        if tracked.just_closed:
            tracked.closed_signature, tracked.just_closed = signature, False
        still_seconds = now - tracked.unchanged_since
        closed = tracked.closed_signature == signature  # closed by its writer, nothing changed since
        settled = closed or still_seconds >= self.settle_seconds
        marker = tracked.checkpoint.marker
        if check.whole and (marker is None or marker.exists()):
            if closed:
                return "ready", f"{check.reason}; closed by its writer"
            if settled:
                return "ready", check.reason
            return "waiting", f"whole, settling ({still_seconds:.1f} of {self.settle_seconds} s)"
        if check.corrupt and settled:
            return "abandoned", f"corrupt: {check.reason}"
        if still_seconds >= self.abandon_seconds:
            if not check.whole:
                return "abandoned", f"truncated for good: {check.reason}; unchanged for {still_seconds:.0f} s"
            return "abandoned", f"{marker} never appeared; unchanged for {still_seconds:.0f} s"
        if not check.whole:
            return "waiting", f"not whole yet: {check.reason}"
        return "waiting", f"whole, waiting for marker {marker}"
