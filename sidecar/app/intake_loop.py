"""The intake loop: the watcher's events become ready checkpoints in the job store.

One iteration (`loop_once(now)`), driven by tests with fake time and no threads:

1. reload the trainer config if its file changed (`PlanSource`; a bad edit is logged and
   the old plan kept): checkpoints added from now on get the new plan;
2. drain the watcher's queue into the readiness tracker (the two files of a split Wan 2.2
   step as one checkpoint, `sidecar.intake.split`);
3. act on the tracker's verdicts: a *ready* checkpoint is copied at once into the cache
   (hashed as it is copied), given its step, and added to the store with the current
   plan; *vanished* and *abandoned* ones are recorded as failed with the reason.

The dispatcher also calls `loop_once` between two images, so a slow render does not let
the trainer prune the next checkpoint unseen.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import queue
import re
from collections.abc import Iterator
from pathlib import Path

from sidecar.app.plan_source import PlanSource
from sidecar.errors import SidecarError
from sidecar.intake.cache import ChangedWhileCopying, CheckpointCache, unusable_fingerprint
from sidecar.intake.layouts import Checkpoint
from sidecar.intake.readiness import ReadinessTracker, ReadyEvent
from sidecar.intake.split import file_signature, files_of, files_signature, recorded_as
from sidecar.intake.steps import StepCounter, resolve_step, step_from_metadata
from sidecar.intake.trust import OutsideWatchedFolder, check_inside
from sidecar.intake.watcher import FINISHED_KINDS, EventKind, FileEvent, scan_tree
from sidecar.jobs.store import JobStore

logger = logging.getLogger("sidecar.intake")

MAX_COPY_FAILURES = 3  # unreadable (permissions, I/O errors) this often: recorded failed


def _step_order(verdict: ReadyEvent) -> tuple[bool, int, str]:
    """Checkpoints with a step (in the name, else in the metadata) first, so that a final
    without any step is placed after all of them."""
    checkpoint = verdict.checkpoint
    step = checkpoint.step
    if step is None and verdict.state == "ready" and not checkpoint.is_pickle:
        try:
            step = step_from_metadata(checkpoint.path)
        except (SidecarError, OSError):
            step = None
    return step is None, step or 0, str(checkpoint.path)


def _describe(checkpoint: Checkpoint) -> str:
    step = "no step in its name" if checkpoint.step is None else f"step {checkpoint.step}"
    return f"{checkpoint.path} ({checkpoint.layout}, {step})"


class Intake:
    """Trainer folder -> ready checkpoints in the store, one `loop_once(now)` at a time."""

    def __init__(
        self,
        *,
        output_dir: Path,
        events: queue.Queue[FileEvent],
        store: JobStore,
        cache: CheckpointCache,
        plans: PlanSource,
        steps: StepCounter,
        pattern: re.Pattern[str] | None = None,
        ignore: tuple[Path, ...] = (),
        follow_symlinks: bool = False,
        settle_seconds: float,
        abandon_seconds: float,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.events = events
        self.store = store
        self.cache = cache
        self.plans = plans
        self.steps = steps
        self.pattern = pattern
        self.ignore = ignore  # sidecar's own samples folder, where it lies in the output folder
        self.follow_symlinks = follow_symlinks
        self.tracker = ReadinessTracker(settle_seconds=settle_seconds, abandon_seconds=abandon_seconds)
        self._tracking: set[Path] = set()
        self._copy_failures: dict[Path, int] = {}
        self._known: dict[Path, tuple[int, int]] = {}  # path -> (size, mtime_ns) already recorded
        self._refused: dict[Path, str] = {}  # symlink -> its target, recorded as outside the folder
        for job in store.checkpoints():
            if job.content_hash is not None and job.size_bytes is not None and job.mtime_ns is not None:
                self._known[job.path] = (job.size_bytes, job.mtime_ns)
            steps.note(job.step)
        cache.clean(job.content_hash for job in store.queue() if job.content_hash)

    @property
    def tracking(self) -> bool:
        """Files are settling: the caller should look again soon, whatever the queue says."""
        return bool(self._tracking)

    def is_settled(self) -> bool:
        """Nothing waits in the event queue or the readiness tracker."""
        return self.events.empty() and not self._tracking

    def expects_work(self) -> bool:
        """Checkpoints are on their way: files settling, or events of files not recorded with
        their current size and mtime (what a startup scan finds). The base may start loading."""
        if self._tracking:
            return True
        with self.events.mutex:  # a look at the queue, taking nothing out
            seen = [event.checkpoint for event in self.events.queue if event.checkpoint is not None]
        checkpoints = [self._recorded_as(checkpoint) for checkpoint in seen]
        return any(self._known.get(found.path) != files_signature(found) for found in checkpoints)

    def _recorded_as(self, checkpoint: Checkpoint) -> Checkpoint:
        """A split part as the checkpoint of its step, under the file it is tracked or recorded as."""
        return recorded_as(checkpoint, taken=lambda path: path in self._tracking or path in self._known)

    def waiting(self) -> list[tuple[Path, str]]:
        """Every file seen but not ready yet, with the reason (for `sidecar status`)."""
        return self.tracker.waiting()

    def _scan(self, folder: Path, kind: EventKind = "scanned") -> Iterator[FileEvent]:
        return scan_tree(folder, root=self.output_dir, pattern=self.pattern, ignore=self.ignore, kind=kind)

    def rescan(self) -> int:
        """Feed every checkpoint under the output folder in again (sure to miss nothing)."""
        count = 0
        for event in self._scan(self.output_dir):
            self.events.put(event)
            count += 1
        return count

    def loop_once(self, now: float) -> bool:
        """One iteration; True when it did anything (a reload, events, verdicts)."""
        did_work = self.plans.reload_if_changed()
        while True:
            try:
                event = self.events.get_nowait()
            except queue.Empty:
                break
            did_work = True
            self._handle_event(event, now)
        verdicts = self.tracker.poll(now) if self._tracking else []
        verdicts.sort(key=_step_order)
        for verdict in verdicts:
            did_work = True
            self._tracking.discard(verdict.checkpoint.path)
            try:
                if verdict.state == "ready":
                    self._ingest(verdict, now)
                elif verdict.state == "vanished":
                    self._record_vanished(verdict.checkpoint, verdict.reason, now)
                else:
                    self._record_unusable(verdict.checkpoint, verdict.reason, now)
            except Exception:  # one file must not stop the daemon
                logger.exception("could not record %s", verdict.checkpoint.path)
        return did_work

    # --- events -------------------------------------------------------------------------

    def _handle_event(self, event: FileEvent, now: float) -> None:
        if event.is_directory:
            if event.kind in ("created", "moved") and event.path.is_dir():
                # a folder renamed into place holds finished files: as good as closed
                for found in self._scan(event.path, kind=event.kind):
                    self._observe(found.checkpoint, now, closed=event.kind == "moved")  # type: ignore[arg-type]
            return
        if event.kind in ("deleted", "failed") or event.checkpoint is None:
            return  # a tracked file that is gone is reported by the tracker; a failed watcher by watch
        closed = event.kind in FINISHED_KINDS or (event.kind == "scanned" and self._still(event.path, now))
        self._observe(event.checkpoint, now, closed=closed)

    def _still(self, path: Path, now: float) -> bool:
        """A file found by a scan, unchanged for `settle_seconds` by its mtime, has settled already:
        nothing waits at startup for what the trainer wrote before sidecar started."""
        signature = file_signature(path)
        return signature is not None and signature[1] / 1e9 <= now - self.tracker.settle_seconds

    def _observe(self, checkpoint: Checkpoint, now: float, *, closed: bool = False) -> None:
        checkpoint = self._recorded_as(checkpoint)
        path = checkpoint.path
        if path not in self._tracking:
            known = self._known.get(path)
            if known is not None and known == files_signature(checkpoint):
                return  # already recorded with this content (startup scan, late event)
            if not self.follow_symlinks and self._outside(checkpoint, now):
                return
            self._tracking.add(path)
            self.steps.note(checkpoint.step)
            logger.info("seen %s", _describe(checkpoint))
        self.tracker.observe(checkpoint, now, closed=closed)

    def _outside(self, checkpoint: Checkpoint, now: float) -> bool:
        """A symlink out of the watched folder (either file of a split checkpoint): recorded failed
        once per target, never read."""
        try:
            for path in files_of(checkpoint):
                check_inside(path, self.output_dir)
        except OutsideWatchedFolder as error:
            target = os.path.realpath(checkpoint.path)
            if self._refused.get(checkpoint.path) != target:
                self._refused[checkpoint.path] = target
                self._record_refused(checkpoint, str(error), now)
            return True
        self._refused.pop(checkpoint.path, None)
        return False

    # --- verdicts -----------------------------------------------------------------------

    def _with_step(self, checkpoint: Checkpoint, *, header_of: Path | None) -> Checkpoint:
        """The checkpoint with a step: from its name, its metadata (`header_of`), else the rule."""
        if checkpoint.step is None and header_of is not None and not checkpoint.is_pickle:
            resolved = resolve_step(dataclasses.replace(checkpoint, path=header_of))
            checkpoint = dataclasses.replace(resolved, path=checkpoint.path)
        if checkpoint.step is None:
            step = self.steps.next_unknown()
            logger.info(
                "%s has no step in its name or metadata; using %s, one past the highest step seen",
                checkpoint.path,
                step,
            )
            checkpoint = dataclasses.replace(checkpoint, step=step)
        self.steps.note(checkpoint.step)
        return checkpoint

    def _ingest(self, verdict: ReadyEvent, now: float) -> None:
        """Copy a whole checkpoint into the cache and add it to the store, before it can be pruned."""
        checkpoint = verdict.checkpoint
        if checkpoint.is_pickle:
            self._record_unusable(checkpoint, checkpoint.pickle_message, now)
            return
        root = None if self.follow_symlinks else self.output_dir
        try:
            copy = self.cache.copy_in(
                checkpoint.path, (verdict.size, verdict.mtime_ns), root=root, siblings=dict(verdict.siblings)
            )
        except OutsideWatchedFolder as error:  # swapped for a link after it was seen
            self._record_refused(checkpoint, str(error), now)
            return
        except FileNotFoundError as error:  # a split checkpoint's: either file
            gone = Path(error.filename or checkpoint.path).name
            self._record_vanished(checkpoint, f"{gone} vanished while it was being read (pruned?)", now)
            return
        except ChangedWhileCopying:
            logger.info("%s changed while it was being copied; waiting for it to settle", checkpoint.path)
            self._observe(checkpoint, now)
            return
        except OSError as error:
            failures = self._copy_failures.get(checkpoint.path, 0) + 1
            self._copy_failures[checkpoint.path] = failures
            if failures >= MAX_COPY_FAILURES:
                self._record_unusable(checkpoint, f"cannot be read ({failures} tries): {error}", now)
            else:
                logger.warning("%s cannot be read yet (%s); trying again", checkpoint.path, error)
                self._observe(checkpoint, now)
            return
        self._copy_failures.pop(checkpoint.path, None)
        try:
            checkpoint = self._with_step(checkpoint, header_of=copy.path)
        except SidecarError as error:
            self.cache.drop(copy.content_hash)
            self._record_unusable(checkpoint, str(error), now)
            return
        plan = self.plans.plan
        self.store.add_checkpoint(
            checkpoint,
            content_hash=copy.content_hash,
            size_bytes=copy.size_bytes,
            mtime_ns=copy.mtime_ns,
            requests=self.plans.requests_for(checkpoint),
            now=now,
            sample_every=plan.sample_every,
            output=plan.output_options(),
            cadence_skip=self.plans.cadence_skip(checkpoint, now),
        )
        self._known[checkpoint.path] = (copy.size_bytes, copy.mtime_ns)
        if not self.store.content_needed(copy.content_hash):  # skipped, or already rendered
            self.cache.drop(copy.content_hash)

    def _record_vanished(self, checkpoint: Checkpoint, reason: str, now: float) -> None:
        if checkpoint.path in self._known:
            logger.info("%s is gone; it was already copied, nothing is lost", checkpoint.path)
            return
        self.store.record_vanished(checkpoint, now=now, reason=reason)

    def _record_unusable(self, checkpoint: Checkpoint, reason: str, now: float) -> None:
        """A checkpoint that can never be rendered (truncated for good, pickle, unreadable).

        A later good write of the same path and step resets the row.
        """
        fingerprint = unusable_fingerprint(*files_of(checkpoint))
        if fingerprint is None:
            checkpoint = self._with_step(checkpoint, header_of=None)
            self.store.record_vanished(checkpoint, now=now, reason=f"{reason}; then it vanished")
            return
        self._record_failed(checkpoint, reason, fingerprint, now)

    def _record_refused(self, checkpoint: Checkpoint, reason: str, now: float) -> None:
        """A checkpoint sidecar will not read (a symlink out of the watched folder): failed with why."""
        target = os.path.realpath(checkpoint.path)
        identity = hashlib.sha256(f"refused\0{checkpoint.path}\0{target}".encode()).hexdigest()
        try:
            link = os.lstat(checkpoint.path)
        except OSError:
            return
        self._record_failed(checkpoint, reason, (identity, link.st_size, link.st_mtime_ns), now)

    def _record_failed(
        self, checkpoint: Checkpoint, reason: str, fingerprint: tuple[str, int, int], now: float
    ) -> None:
        checkpoint = self._with_step(checkpoint, header_of=None)
        identity, size, mtime_ns = fingerprint
        job = self.store.add_checkpoint(
            checkpoint, content_hash=identity, size_bytes=size, mtime_ns=mtime_ns, requests=(), now=now
        )
        if size >= 0:
            self._known[checkpoint.path] = (size, mtime_ns)
        if job.state in ("pending", "running"):
            self.store.mark_checkpoint_failed(job.id, reason, transient=False, now=now)
            logger.warning("%s failed: %s", _describe(checkpoint), reason)
