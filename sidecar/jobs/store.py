"""The job store: which checkpoints and samples are rendered, exactly once, across restarts.

SQLite in the samples folder (the caller gives the path, e.g.
`SAMPLES_DIR/.sidecar/jobs.sqlite3`). One row per checkpoint and one per sample.
The worker drives it one step at a time with an explicit `now`:

    claimed = store.claim_next_checkpoint(now)
    for sample in claimed.samples:  # render, then
        store.mark_sample_done(sample.id, output_path=..., now=now)
    store.finish_checkpoint(claimed.checkpoint.id, now=now)

Design decisions:

- Exactly once. A claim is one `BEGIN IMMEDIATE` transaction, so two processes never
  claim the same checkpoint. Each store holds an owner lock file for its lifetime;
  rows left `running` by an owner whose lock is free (the process died, even by
  `kill -9`) go back to `pending` on open (`recover`). Re-rendering an interrupted
  sample cannot duplicate because output files are replaced atomically by name.
  A checkpoint whose process died `MAX_INTERRUPTIONS` times is failed, not retried forever.
- Identity. A checkpoint is its path and step; adding it again with the same content (the
  startup scan re-adds everything) returns the existing row. Content is no identity:
  a trainer that saves equal bytes at two steps (unchanged weights, a final file equal
  to the last step's) gets a row per step, noted as identical to the earlier one, whose
  images the dispatcher links instead of rendering again (`identical_done_samples`). The
  same path and step with new content (a resumed trainer rewrote it in place) updates that
  row: samples already done are kept (they show that step; re-rendering would double the
  GPU time for an image the user already has) and a note says so; `force_render` redoes
  them. A row that had failed or vanished is reset to pending, since the new file may be good.
- The sample plan is copied into sample rows when a checkpoint is added, so a changed
  `sample:` section applies to later checkpoints only.
- Failures: transient ones retry with doubling backoff up to `max_attempts`; permanent
  ones are recorded with their message and never retried automatically.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from sidecar.confined import ConfinedFolder
from sidecar.intake.layouts import Checkpoint
from sidecar.jobs.claims import JobClaims
from sidecar.jobs.locks import OwnerLock
from sidecar.jobs.policy import MAX_ATTEMPTS, RETRY_BASE_SECONDS, skip_reason
from sidecar.jobs.queries import STEP_ORDER
from sidecar.jobs.records import (
    CHECKPOINT_COLUMNS,
    CheckpointJob,
    State,
    checkpoint_from_row,
    identical_note,
    output_json,
)
from sidecar.jobs.schema import create_or_migrate
from sidecar.plan.request import SampleRequest

logger = logging.getLogger("sidecar.jobs")

BUSY_TIMEOUT_SECONDS = 30.0
STORE_FILE_SUFFIXES = ("", "-wal", "-shm", "-journal")  # the store and the files SQLite keeps beside it
OWNERS_SUFFIX = ".owners"  # the folder of owner locks beside the store
VANISHED = "vanished"


def check_store_files(path: Path) -> None:
    """Refuse a store whose folder or files are symlinks, hard links or the wrong kind.

    SQLite opens its files by path and writes the journal and shared memory in place; a
    planted link would have it write elsewhere. Checked just before they are opened.
    """
    with ConfinedFolder.own(path.parent) as folder:
        for suffix in STORE_FILE_SUFFIXES:
            folder.require_plain_file(path.name + suffix)


class JobStore(JobClaims):
    """SQLite store of checkpoint and sample jobs; safe to open from several processes.

    Opening it recovers rows left `running` by a dead process. Use as a context manager
    or call `close`. All times are float seconds given by the caller.
    """

    def __init__(
        self,
        path: Path,
        *,
        now: float = 0.0,
        max_attempts: int = MAX_ATTEMPTS,
        retry_base_seconds: float = RETRY_BASE_SECONDS,
        busy_timeout_seconds: float = BUSY_TIMEOUT_SECONDS,
    ) -> None:
        if max_attempts < 1:
            raise ValueError(f"`max_attempts` must be at least 1, got {max_attempts}")
        self.path = Path(path)
        self.max_attempts = max_attempts
        self.retry_base_seconds = retry_base_seconds
        self._owners = self.path.parent / f"{self.path.name}{OWNERS_SUFFIX}"
        check_store_files(self.path)
        self._lock = OwnerLock(self._owners)
        self._conn = sqlite3.connect(self.path, timeout=busy_timeout_seconds, isolation_level=None)
        self._conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_seconds * 1000)}")
        self._conn.execute("PRAGMA journal_mode = WAL")
        self._conn.execute("PRAGMA synchronous = NORMAL")
        self._conn.execute("PRAGMA foreign_keys = ON")
        try:
            with self._transaction() as conn:
                found = create_or_migrate(conn, path=self.path)
        except BaseException:
            self.close()
            raise
        if found > 0:
            logger.debug("job store %s: schema version %s", self.path, found)
        self.recover(now)

    # --- plumbing ---------------------------------------------------------------------

    def close(self) -> None:
        """Close the connection and release the owner lock (rows still running stay so)."""
        self._conn.close()
        self._lock.release()

    def __enter__(self) -> JobStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- adding -------------------------------------------------------------------------

    def add_checkpoint(
        self,
        checkpoint: Checkpoint,
        *,
        content_hash: str,
        size_bytes: int,
        mtime_ns: int,
        requests: Sequence[SampleRequest],
        now: float,
        sample_every: int | None = None,
        output: Mapping[str, Any] | None = None,
        cadence_skip: str | None = None,
    ) -> CheckpointJob:
        """Record a ready checkpoint and its sample plan; idempotent on path+step and content.

        `requests` is the sample plan as it is now; it is stored with the checkpoint.
        Under `sample_every` a checkpoint off the schedule is recorded as `skipped`; so is
        one the trainer's epoch or time cadence leaves out (`cadence_skip`, its reason).
        """
        with self._transaction() as conn:
            row = conn.execute(
                f"SELECT {CHECKPOINT_COLUMNS} FROM checkpoints WHERE path = ? AND COALESCE(step, -1) = ?",
                (str(checkpoint.path), -1 if checkpoint.step is None else checkpoint.step),
            ).fetchone()
            if row is not None and checkpoint_from_row(row).content_hash == content_hash:
                existing = checkpoint_from_row(row)
                if checkpoint.is_final and not existing.is_final:
                    conn.execute(
                        "UPDATE checkpoints SET is_final = 1, updated_at = ? WHERE id = ?", (now, existing.id)
                    )
                logger.debug("%s already recorded as job %s", checkpoint.path, existing.id)
                return self._get_checkpoint(conn, existing.id)
            if row is not None:
                return self._rewritten(
                    conn,
                    checkpoint_from_row(row),
                    checkpoint,
                    content_hash,
                    size_bytes,
                    mtime_ns,
                    requests,
                    now,
                    output,
                )

            # "First" means the first that will render: a file that failed (unreadable,
            # truncated, a LoRA that did not apply) gave the user nothing to look at.
            is_first = conn.execute(
                "SELECT 1 FROM checkpoints WHERE content_hash IS NOT NULL"
                " AND state IN ('pending', 'running', 'done') LIMIT 1"
            ).fetchone()
            reason = cadence_skip or skip_reason(
                checkpoint.step,
                sample_every=sample_every,
                is_final=checkpoint.is_final,
                is_first=is_first is None,
            )
            state: State = "skipped" if reason else "pending"
            note = self._identical_note(conn, checkpoint, content_hash) if requests else None
            cursor = conn.execute(
                "INSERT INTO checkpoints (path, step, epoch, size_bytes, mtime_ns, content_hash,"
                " layout, is_final, state, error, added_at, updated_at, output_json, note)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    str(checkpoint.path),
                    checkpoint.step,
                    checkpoint.epoch,
                    size_bytes,
                    mtime_ns,
                    content_hash,
                    checkpoint.layout,
                    int(checkpoint.is_final),
                    state,
                    reason,
                    now,
                    now,
                    output_json(output),
                    note,
                ),
            )
            checkpoint_id = int(cursor.lastrowid or 0)
            self._insert_samples(conn, checkpoint_id, requests, state, reason, now)
            logger.info(
                "added step %s (%s) as job %s: %s%s",
                checkpoint.step,
                checkpoint.path,
                checkpoint_id,
                reason or f"{len(requests)} samples pending",
                f"; {note}" if note else "",
            )
            return self._get_checkpoint(conn, checkpoint_id)

    @staticmethod
    def _identical_note(conn: sqlite3.Connection, checkpoint: Checkpoint, content_hash: str) -> str | None:
        """The note of a checkpoint whose bytes equal an earlier step's, or None."""
        row = conn.execute(
            f"SELECT step, path FROM checkpoints WHERE content_hash = ? ORDER BY {STEP_ORDER} LIMIT 1",
            (content_hash,),
        ).fetchone()
        if row is None:
            return None
        step, path = row
        return identical_note(step, Path(str(path)))

    def _rewritten(
        self,
        conn: sqlite3.Connection,
        existing: CheckpointJob,
        checkpoint: Checkpoint,
        content_hash: str,
        size_bytes: int,
        mtime_ns: int,
        requests: Sequence[SampleRequest],
        now: float,
        output: Mapping[str, Any] | None,
    ) -> CheckpointJob:
        """Same path and step, new content: keep what was rendered, retry what had failed."""
        had_failed = existing.content_hash is None or existing.state == "failed"
        if had_failed:
            note = f"file reappeared with new content at {now:.0f}; retrying"
            conn.execute(
                "UPDATE checkpoints SET content_hash = ?, size_bytes = ?, mtime_ns = ?, state = 'pending',"
                " attempts = 0, interruptions = 0, error = NULL, retry_at = NULL, note = ?,"
                " is_final = MAX(is_final, ?), updated_at = ? WHERE id = ?",
                (content_hash, size_bytes, mtime_ns, note, int(checkpoint.is_final), now, existing.id),
            )
            conn.execute(
                "UPDATE samples SET state = 'pending', attempts = 0, error = NULL, retry_at = NULL,"
                " updated_at = ?"
                " WHERE checkpoint_id = ? AND state = 'failed'",
                (now, existing.id),
            )
            if (
                conn.execute("SELECT 1 FROM samples WHERE checkpoint_id = ?", (existing.id,)).fetchone()
                is None
            ):
                self._insert_samples(conn, existing.id, requests, "pending", None, now)
                conn.execute(
                    "UPDATE checkpoints SET output_json = ? WHERE id = ?", (output_json(output), existing.id)
                )
        else:
            note = (
                f"rewritten in place with new content at {now:.0f} (trainer resumed?); samples already done "
                f"were kept; `sidecar render --step {existing.step} --force` renders them again"
            )
            conn.execute(
                "UPDATE checkpoints SET content_hash = ?, size_bytes = ?, mtime_ns = ?, note = ?,"
                " is_final = MAX(is_final, ?), updated_at = ? WHERE id = ?",
                (content_hash, size_bytes, mtime_ns, note, int(checkpoint.is_final), now, existing.id),
            )
        logger.info("job %s (%s): %s", existing.id, checkpoint.path, note)
        return self._get_checkpoint(conn, existing.id)

    def record_vanished(self, checkpoint: Checkpoint, *, now: float, reason: str = VANISHED) -> CheckpointJob:
        """Record, once, that a checkpoint disappeared before it could be read or rendered.

        A checkpoint already rendered is left alone: trainers prune old files, which is no failure.
        """
        message = reason if reason.startswith(VANISHED) else f"{VANISHED}: {reason}"
        with self._transaction() as conn:
            row = conn.execute(
                f"SELECT {CHECKPOINT_COLUMNS} FROM checkpoints WHERE path = ? AND COALESCE(step, -1) = ?",
                (str(checkpoint.path), -1 if checkpoint.step is None else checkpoint.step),
            ).fetchone()
            if row is not None:
                existing = checkpoint_from_row(row)
                if existing.state in ("pending", "running"):
                    self._fail_checkpoint(conn, existing.id, message, now)
                return self._get_checkpoint(conn, existing.id)
            cursor = conn.execute(
                "INSERT INTO checkpoints (path, step, epoch, layout, is_final, state, error,"
                " added_at, finished_at,"
                " updated_at) VALUES (?, ?, ?, ?, ?, 'failed', ?, ?, ?, ?)",
                (
                    str(checkpoint.path),
                    checkpoint.step,
                    checkpoint.epoch,
                    checkpoint.layout,
                    int(checkpoint.is_final),
                    message,
                    now,
                    now,
                    now,
                ),
            )
            logger.warning("%s: %s", checkpoint.path, message)
            return self._get_checkpoint(conn, int(cursor.lastrowid or 0))
