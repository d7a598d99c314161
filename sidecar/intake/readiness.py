"""When a checkpoint a trainer writes in place is ready to read: whole, settled, marked.

Trainers write checkpoints in place (not by rename), so a file is ready only once it
is whole (its safetensors header parses and declares the file's exact size), its size
and mtime have not changed for `settle_seconds`, and its layout's marker file (if any)
exists. A split Wan 2.2 checkpoint is its files together (`sidecar.intake.split`): each
present whole and settled, and its sibling there too or not coming. Time is passed in, so
tests need no sleeps.
"""

from __future__ import annotations

import json
import logging
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from sidecar.intake.layouts import Checkpoint
from sidecar.intake.split import SIBLING_GRACE_SECONDS, files_of, sibling_of
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
    siblings: tuple[tuple[Path, tuple[int, int]], ...] = ()  # a split checkpoint's other file, judged with it


Signature = tuple[tuple[int, int], ...]  # (size, mtime_ns) of each file of a checkpoint


@dataclass
class _Tracked:
    checkpoint: Checkpoint
    signature: Signature | None = None  # last seen
    unchanged_since: float = 0.0
    last: Completeness | None = None  # of the checkpoint's own file
    siblings: tuple[tuple[Path, tuple[int, int]], ...] = ()  # the other files present, last seen
    reason: str = "not looked at yet"
    just_closed: bool = False  # a close (or rename into place) event came; not yet looked at
    closed_signature: Signature | None = None  # when its writer closed a file of it
    alone_since: float | None = None  # a split part whole and settled, its sibling absent: since when


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

    A split Wan 2.2 part (`Checkpoint.split`) is judged with its sibling's file, the same way,
    once that is there; alone, it is ready only after `sibling_grace_seconds` without one
    (`abandon_seconds` in a run whose earlier step was ready as a pair).
    """

    def __init__(
        self,
        *,
        settle_seconds: float = SETTLE_SECONDS,
        abandon_seconds: float = ABANDON_SECONDS,
        sibling_grace_seconds: float = SIBLING_GRACE_SECONDS,
    ) -> None:
        if settle_seconds < 0 or abandon_seconds <= settle_seconds:
            raise ValueError(
                f"`abandon_seconds` must exceed `settle_seconds` >= 0, got {abandon_seconds} and"
                f" {settle_seconds}"
            )
        if sibling_grace_seconds < 0:
            raise ValueError(f"`sibling_grace_seconds` must be >= 0, got {sibling_grace_seconds}")
        self.settle_seconds = settle_seconds
        self.abandon_seconds = abandon_seconds
        self.sibling_grace_seconds = sibling_grace_seconds
        self._tracked: dict[Path, _Tracked] = {}
        self._paired_runs: set[tuple[Path, str]] = set()  # (folder, run name) seen ready as a pair

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
            events.append(ReadyEvent(tracked.checkpoint, state, reason, size, mtime_ns, tracked.siblings))
            if state == "ready" and tracked.siblings:
                self._paired_runs.add((path.parent, tracked.checkpoint.name))
            log = logger.info if state == "ready" else logger.warning
            log("%s %s: %s", path, state, reason)
        return events

    def _evaluate(self, tracked: _Tracked, now: float) -> tuple[ReadyState, str]:
        state, reason = self._verdict(tracked, now)
        tracked.reason = reason
        return state, reason

    def _verdict(self, tracked: _Tracked, now: float) -> tuple[ReadyState, str]:
        own, *others = [(path, completeness(path)) for path in files_of(tracked.checkpoint)]
        check = own[1]
        tracked.last = check
        if not check.exists:
            return "vanished", "vanished before it could be read (pruned or deleted by the trainer?)"
        files = [own, *((path, other) for path, other in others if other.exists)]
        tracked.siblings = tuple((path, (other.size, other.mtime_ns)) for path, other in files[1:])
        signature = tuple((found.size, found.mtime_ns) for _, found in files)
        if signature != tracked.signature:
            tracked.signature = signature
            tracked.unchanged_since = now
        if tracked.just_closed:
            tracked.closed_signature, tracked.just_closed = signature, False
        still_seconds = now - tracked.unchanged_since
        closed = tracked.closed_signature == signature  # closed by its writer, nothing changed since
        settled = closed or still_seconds >= self.settle_seconds
        marker = tracked.checkpoint.marker
        unfinished = next(((path, found) for path, found in files if not found.whole), None)
        if unfinished is None and (marker is None or marker.exists()):
            reason = "; ".join(_reason(tracked.checkpoint, path, found) for path, found in files)
            if not settled:
                return "waiting", f"whole, settling ({still_seconds:.1f} of {self.settle_seconds} s)"
            alone = self._alone(tracked, now)
            if alone is not None and not alone[0]:
                return "waiting", alone[1]
            reason = f"{reason}; {alone[1]}" if alone is not None else reason
            return "ready", f"{reason}; closed by its writer" if closed else reason
        if unfinished is None:
            if still_seconds >= self.abandon_seconds:
                return "abandoned", f"{marker} never appeared; unchanged for {still_seconds:.0f} s"
            return "waiting", f"whole, waiting for marker {marker}"
        path, found = unfinished
        why = _reason(tracked.checkpoint, path, found)
        corrupt = next((item for item in files if item[1].corrupt), None)
        if corrupt is not None and settled:
            return "abandoned", f"corrupt: {_reason(tracked.checkpoint, *corrupt)}"
        if still_seconds >= self.abandon_seconds:
            return "abandoned", f"truncated for good: {why}; unchanged for {still_seconds:.0f} s"
        return "waiting", f"not whole yet: {why}"

    def _alone(self, tracked: _Tracked, now: float) -> tuple[bool, str] | None:
        """For a split part whole and settled without its sibling: (waited long enough, why);
        None for any other checkpoint."""
        checkpoint = tracked.checkpoint
        sibling = sibling_of(checkpoint)
        if sibling is None or tracked.siblings:
            tracked.alone_since = None
            return None
        assert tracked.last is not None
        if tracked.alone_since is None:  # since its last write, when it is found long after
            tracked.alone_since = min(now, tracked.last.mtime_ns / 1e9)
        waited = now - tracked.alone_since
        paired = (checkpoint.path.parent, checkpoint.name) in self._paired_runs
        wait = max(self.abandon_seconds, self.sibling_grace_seconds) if paired else self.sibling_grace_seconds
        if waited < wait:
            run = "; this run wrote pairs before" if paired else ""
            return (
                False,
                f"whole, waiting for its sibling {sibling.path.name} ({waited:.1f} of {wait:g} s{run})",
            )
        return True, f"no sibling {sibling.path.name} after {waited:.0f} s: {checkpoint.split} alone"


def _reason(checkpoint: Checkpoint, path: Path, check: Completeness) -> str:
    """A file's completeness, named when it is a split checkpoint's other file."""
    return check.reason if path == checkpoint.path else f"{path.name}: {check.reason}"
