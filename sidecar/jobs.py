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
- Identity. A checkpoint is its content hash; adding the same content again (the startup
  scan re-adds everything) returns the existing row. The same path and step with new
  content (a resumed trainer rewrote it in place) updates that row: samples already
  done are kept (they show that step; re-rendering would double the GPU time for an
  image the user already has) and a note says so; `force_render` redoes them. A row
  that had failed or vanished is reset to pending, since the new file may be good.
- The sample plan is copied into sample rows when a checkpoint is added, so a changed
  `sample:` section applies to later checkpoints only.
- Failures: transient ones retry with doubling backoff up to `max_attempts`; permanent
  ones are recorded with their message and never retried automatically.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import sqlite3
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from sidecar.checkpoints import Checkpoint
from sidecar.errors import CheckpointError
from sidecar.prompts import SampleRequest

try:  # POSIX advisory locks tell a live owner from a dead one; elsewhere, pids do
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

logger = logging.getLogger("sidecar.jobs")

State = Literal["pending", "running", "done", "failed", "skipped"]
Backlog = Literal["all", "latest"]
STATES: tuple[State, ...] = ("pending", "running", "done", "failed", "skipped")
BACKLOG_POLICIES: tuple[Backlog, ...] = ("all", "latest")

SCHEMA_VERSION = 1
BUSY_TIMEOUT_SECONDS = 30.0
MAX_ATTEMPTS = 3  # renders of one checkpoint (or sample) before a transient error becomes final
RETRY_BASE_SECONDS = 30.0  # first backoff; doubles per attempt
MAX_INTERRUPTIONS = 3  # process deaths while rendering one checkpoint before it is failed
VANISHED = "vanished"

CREATE_CHECKPOINTS = """
CREATE TABLE IF NOT EXISTS checkpoints (
    id INTEGER PRIMARY KEY,
    path TEXT NOT NULL,
    step INTEGER,
    epoch INTEGER,
    size_bytes INTEGER,
    mtime_ns INTEGER,
    content_hash TEXT,
    layout TEXT NOT NULL,
    is_final INTEGER NOT NULL DEFAULT 0,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    interruptions INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    note TEXT,
    retry_at REAL,
    claimed_by TEXT,
    added_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    updated_at REAL NOT NULL
)"""
CREATE_CHECKPOINTS_HASH = (
    "CREATE UNIQUE INDEX IF NOT EXISTS checkpoints_content_hash ON checkpoints (content_hash) "
    "WHERE content_hash IS NOT NULL"
)
CREATE_CHECKPOINTS_PATH_STEP = (
    "CREATE UNIQUE INDEX IF NOT EXISTS checkpoints_path_step ON checkpoints (path, COALESCE(step, -1))"
)
CREATE_CHECKPOINTS_STATE = "CREATE INDEX IF NOT EXISTS checkpoints_state_step ON checkpoints (state, step)"
CREATE_SAMPLES = """
CREATE TABLE IF NOT EXISTS samples (
    id INTEGER PRIMARY KEY,
    checkpoint_id INTEGER NOT NULL REFERENCES checkpoints (id) ON DELETE CASCADE,
    sample_index INTEGER NOT NULL,
    fingerprint TEXT NOT NULL,
    request_json TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    retry_at REAL,
    output_path TEXT,
    updated_at REAL NOT NULL,
    UNIQUE (checkpoint_id, sample_index)
)"""
CREATE_SAMPLES_STATE = "CREATE INDEX IF NOT EXISTS samples_checkpoint_state ON samples (checkpoint_id, state)"
DDL = (
    CREATE_CHECKPOINTS,
    CREATE_CHECKPOINTS_HASH,
    CREATE_CHECKPOINTS_PATH_STEP,
    CREATE_CHECKPOINTS_STATE,
    CREATE_SAMPLES,
    CREATE_SAMPLES_STATE,
)

# Oldest step first; a checkpoint without a known step (a final file) after all others.
_STEP_ORDER = "CASE WHEN step IS NULL THEN 1 ELSE 0 END, step, id"
_NEWEST_FIRST = "CASE WHEN step IS NULL THEN 0 ELSE 1 END, step DESC, id DESC"
_CHECKPOINT_COLUMNS = (
    "id, path, step, epoch, size_bytes, mtime_ns, content_hash, layout, is_final, state, attempts, "
    "interruptions, error, note, retry_at, added_at, started_at, finished_at"
)
_SAMPLE_COLUMNS = (
    "id, checkpoint_id, sample_index, fingerprint, request_json, state, attempts, error, retry_at, "
    "output_path"
)


@dataclass(frozen=True)
class CheckpointJob:
    """A checkpoint row: what was added and how far its rendering has come."""

    id: int
    path: Path
    step: int | None
    epoch: int | None
    size_bytes: int | None
    mtime_ns: int | None
    content_hash: str | None  # None for a file that vanished before it could be read
    layout: str
    is_final: bool
    state: State
    attempts: int
    interruptions: int
    error: str | None  # failure text, or the reason it was skipped
    note: str | None  # e.g. rewritten in place, samples kept
    retry_at: float | None
    added_at: float
    started_at: float | None
    finished_at: float | None


@dataclass(frozen=True)
class SampleJob:
    """A sample row: one image of one checkpoint, with the request it was planned with."""

    id: int
    checkpoint_id: int
    index: int
    fingerprint: str
    request: SampleRequest
    state: State
    attempts: int
    error: str | None
    retry_at: float | None
    output_path: Path | None


@dataclass(frozen=True)
class ClaimedCheckpoint:
    """What the worker renders now: the checkpoint and its samples still to do."""

    checkpoint: CheckpointJob
    samples: tuple[SampleJob, ...]


@dataclass(frozen=True)
class Failure:
    """A failed checkpoint (`sample_index` None) or sample, with its reason."""

    checkpoint_id: int
    step: int | None
    path: Path
    sample_index: int | None
    error: str


@dataclass(frozen=True)
class StatusSummary:
    """Everything `sidecar status` shows."""

    checkpoint_counts: dict[str, int]
    sample_counts: dict[str, int]
    queue: tuple[CheckpointJob, ...]  # pending and running, in render order
    last_rendered_step: int | None
    failures: tuple[Failure, ...]


def request_fingerprint(request: SampleRequest) -> str:
    """A short stable hash of every setting of a request: equal settings, equal fingerprint."""
    canonical = json.dumps(dataclasses.asdict(request), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


def skip_reason(step: int | None, *, sample_every: int | None, is_final: bool, is_first: bool) -> str | None:
    """Why a checkpoint is not rendered under `sample_every`, or None when it is.

    Rendered: every multiple of `sample_every`, the final one, the first one the store
    sees (so the user always gets a first look), and any whose step is unknown.
    """
    if sample_every is not None and sample_every < 1:
        raise ValueError(f"`sample_every` must be a positive integer or None, got {sample_every!r}")
    if sample_every is None or sample_every == 1 or step is None or is_final or is_first:
        return None
    if step % sample_every == 0:
        return None
    return f"sample_every: step {step} is not a multiple of {sample_every}"


def retry_delay_seconds(attempts: int, *, base_seconds: float = RETRY_BASE_SECONDS) -> float:
    """Backoff before attempt `attempts + 1`: base, 2x base, 4x base, ..."""
    return base_seconds * (2 ** max(attempts - 1, 0))


class _OwnerLock:
    """A lock file held for a store's lifetime; free once its process is gone (even `kill -9`)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.token = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / f"{self.token}.lock"
        self._handle = self.path.open("w")
        if fcntl is not None:
            fcntl.flock(self._handle, fcntl.LOCK_EX | fcntl.LOCK_NB)

    def release(self) -> None:
        if self._handle.closed:
            return
        self._handle.close()  # closing drops the flock
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    @staticmethod
    def is_alive(folder: Path, token: str) -> bool:
        path = folder / f"{token}.lock"
        if fcntl is None:  # pragma: no cover - Windows: fall back to the pid in the token
            try:
                os.kill(int(token.split("-", 1)[0]), 0)
            except (OSError, ValueError):
                return False
            return True
        try:
            descriptor = os.open(path, os.O_RDWR)  # no O_CREAT: a missing lock file is a dead owner
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(descriptor)  # also drops the lock we may have taken
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        return False


class JobStore:
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
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._owners = self.path.parent / f"{self.path.name}.owners"
        self._lock = _OwnerLock(self._owners)
        self._conn = sqlite3.connect(self.path, timeout=busy_timeout_seconds, isolation_level=None)
        self._conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_seconds * 1000)}")
        self._conn.execute("PRAGMA journal_mode = WAL")
        self._conn.execute("PRAGMA synchronous = NORMAL")
        self._conn.execute("PRAGMA foreign_keys = ON")
        with self._transaction() as conn:
            for statement in DDL:
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
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

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One `BEGIN IMMEDIATE` transaction: commits on success, rolls back on any error."""
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield self._conn
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")

    @staticmethod
    def _checkpoint(row: Sequence[object]) -> CheckpointJob:
        job = CheckpointJob(*row)  # columns are listed in field order
        return dataclasses.replace(job, path=Path(str(job.path)), is_final=bool(job.is_final))

    @staticmethod
    def _sample(row: Sequence[object]) -> SampleJob:
        id_, checkpoint_id, index, fingerprint, request_json, state, attempts, error, retry_at, output = row
        return SampleJob(
            id=int(id_),
            checkpoint_id=int(checkpoint_id),
            index=int(index),
            fingerprint=str(fingerprint),
            request=SampleRequest(**json.loads(str(request_json))),
            state=state,
            attempts=int(attempts),
            error=error,
            retry_at=retry_at,
            output_path=Path(str(output)) if output is not None else None,
        )

    def _get_checkpoint(self, conn: sqlite3.Connection, checkpoint_id: int) -> CheckpointJob:
        row = conn.execute(
            f"SELECT {_CHECKPOINT_COLUMNS} FROM checkpoints WHERE id = ?", (checkpoint_id,)
        ).fetchone()
        if row is None:
            raise KeyError(f"no checkpoint job with id {checkpoint_id}")
        return self._checkpoint(row)

    def _insert_samples(
        self,
        conn: sqlite3.Connection,
        checkpoint_id: int,
        requests: Sequence[SampleRequest],
        state: State,
        error: str | None,
        now: float,
    ) -> None:
        conn.executemany(
            "INSERT INTO samples (checkpoint_id, sample_index, fingerprint, request_json, state,"
            " error, updated_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            [
                (
                    checkpoint_id,
                    r.index,
                    request_fingerprint(r),
                    json.dumps(dataclasses.asdict(r)),
                    state,
                    error,
                    now,
                )
                for r in requests
            ],
        )

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
    ) -> CheckpointJob:
        """Record a ready checkpoint and its sample plan; idempotent on content and on path+step.

        `requests` is the sample plan as it is now; it is stored with the checkpoint.
        Under `sample_every` a checkpoint off the schedule is recorded as `skipped`.
        """
        with self._transaction() as conn:
            row = conn.execute(
                f"SELECT {_CHECKPOINT_COLUMNS} FROM checkpoints WHERE content_hash = ?", (content_hash,)
            ).fetchone()
            if row is not None:
                existing = self._checkpoint(row)
                if checkpoint.is_final and not existing.is_final:
                    conn.execute(
                        "UPDATE checkpoints SET is_final = 1, updated_at = ? WHERE id = ?", (now, existing.id)
                    )
                logger.debug("%s already recorded as job %s (same content)", checkpoint.path, existing.id)
                return self._get_checkpoint(conn, existing.id)

            row = conn.execute(
                f"SELECT {_CHECKPOINT_COLUMNS} FROM checkpoints WHERE path = ? AND COALESCE(step, -1) = ?",
                (str(checkpoint.path), -1 if checkpoint.step is None else checkpoint.step),
            ).fetchone()
            if row is not None:
                return self._rewritten(
                    conn, self._checkpoint(row), checkpoint, content_hash, size_bytes, mtime_ns, requests, now
                )

            # "First" means the first that will render: a file that failed (unreadable,
            # truncated, a LoRA that did not apply) gave the user nothing to look at.
            is_first = conn.execute(
                "SELECT 1 FROM checkpoints WHERE content_hash IS NOT NULL"
                " AND state IN ('pending', 'running', 'done') LIMIT 1"
            ).fetchone()
            reason = skip_reason(
                checkpoint.step,
                sample_every=sample_every,
                is_final=checkpoint.is_final,
                is_first=is_first is None,
            )
            state: State = "skipped" if reason else "pending"
            cursor = conn.execute(
                "INSERT INTO checkpoints (path, step, epoch, size_bytes, mtime_ns, content_hash,"
                " layout, is_final,"
                " state, error, added_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
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
                ),
            )
            checkpoint_id = int(cursor.lastrowid or 0)
            self._insert_samples(conn, checkpoint_id, requests, state, reason, now)
            logger.info(
                "added step %s (%s) as job %s: %s",
                checkpoint.step,
                checkpoint.path,
                checkpoint_id,
                reason or f"{len(requests)} samples pending",
            )
            return self._get_checkpoint(conn, checkpoint_id)

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
                f"SELECT {_CHECKPOINT_COLUMNS} FROM checkpoints WHERE path = ? AND COALESCE(step, -1) = ?",
                (str(checkpoint.path), -1 if checkpoint.step is None else checkpoint.step),
            ).fetchone()
            if row is not None:
                existing = self._checkpoint(row)
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

    # --- the worker's steps -------------------------------------------------------------

    def recover(self, now: float) -> int:
        """Put rows left `running` by dead processes back to `pending`; returns how many.

        A checkpoint interrupted `MAX_INTERRUPTIONS` times is failed instead: something
        in it kills the process, and retrying forever would stop all rendering.
        """
        owners = [
            str(row[0])
            for row in self._conn.execute(
                "SELECT DISTINCT claimed_by FROM checkpoints WHERE state = 'running' AND claimed_by"
                " IS NOT NULL"
            )
        ]
        dead = [o for o in owners if o != self._lock.token and not _OwnerLock.is_alive(self._owners, o)]
        orphans = self._conn.execute(
            "SELECT COUNT(*) FROM checkpoints WHERE state = 'running' AND claimed_by IS NULL"
        ).fetchone()[0]
        if not dead and not orphans:
            return 0
        recovered = 0
        with self._transaction() as conn:
            for owner in [*dead, None]:
                rows = conn.execute(
                    "SELECT id, interruptions FROM checkpoints WHERE state = 'running' AND claimed_by IS ?",
                    (owner,),
                ).fetchall()
                for checkpoint_id, interruptions in rows:
                    recovered += 1
                    conn.execute(
                        "UPDATE samples SET state = 'pending', updated_at = ? WHERE checkpoint_id = ?"
                        " AND state = 'running'",
                        (now, checkpoint_id),
                    )
                    if interruptions + 1 >= MAX_INTERRUPTIONS:
                        message = (
                            f"the process died {interruptions + 1} times while rendering this checkpoint; "
                            "not retried again (look for a crash in the log)"
                        )
                        conn.execute(
                            "UPDATE checkpoints SET interruptions = interruptions + 1, claimed_by = NULL"
                            " WHERE id = ?",
                            (checkpoint_id,),
                        )
                        self._fail_checkpoint(conn, checkpoint_id, message, now)
                    else:
                        conn.execute(
                            "UPDATE checkpoints SET state = 'pending', claimed_by = NULL,"
                            " interruptions = interruptions + 1, updated_at = ? WHERE id = ?",
                            (now, checkpoint_id),
                        )
        logger.warning("recovered %s checkpoint(s) left running by a process that died", recovered)
        return recovered

    def claim_next_checkpoint(self, now: float, *, backlog: Backlog = "all") -> ClaimedCheckpoint | None:
        """Claim the next checkpoint to render, with its samples still to do; None when idle.

        `backlog="all"` renders every pending checkpoint, oldest step first. `"latest"`
        jumps to the newest pending one and marks older pending ones skipped (never a final).
        """
        if backlog not in BACKLOG_POLICIES:
            raise ValueError(f"`backlog` must be one of {', '.join(BACKLOG_POLICIES)}, got {backlog!r}")
        due = "state = 'pending' AND (retry_at IS NULL OR retry_at <= ?)"
        with self._transaction() as conn:
            while True:
                if backlog == "latest":
                    row = conn.execute(
                        f"SELECT {_CHECKPOINT_COLUMNS} FROM checkpoints WHERE {due} ORDER BY"
                        f" {_NEWEST_FIRST} LIMIT 1",
                        (now,),
                    ).fetchone()
                    if row is not None:
                        self._skip_older(conn, self._checkpoint(row), now)
                else:
                    row = conn.execute(
                        f"SELECT {_CHECKPOINT_COLUMNS} FROM checkpoints WHERE {due} ORDER BY"
                        f" {_STEP_ORDER} LIMIT 1",
                        (now,),
                    ).fetchone()
                if row is None:
                    return None
                job = self._checkpoint(row)
                samples = conn.execute(
                    f"SELECT {_SAMPLE_COLUMNS} FROM samples WHERE checkpoint_id = ? AND state = 'pending'"
                    " ORDER BY sample_index",
                    (job.id,),
                ).fetchall()
                if not samples:  # everything already rendered (died before finishing): close it
                    self._finish(conn, job.id, now)
                    continue
                conn.execute(
                    "UPDATE checkpoints SET state = 'running', attempts = attempts + 1, claimed_by = ?,"
                    " started_at = ?, retry_at = NULL, updated_at = ? WHERE id = ?",
                    (self._lock.token, now, now, job.id),
                )
                conn.execute(
                    "UPDATE samples SET state = 'running', updated_at = ? WHERE checkpoint_id = ?"
                    " AND state = 'pending'",
                    (now, job.id),
                )
                claimed = ClaimedCheckpoint(
                    self._get_checkpoint(conn, job.id),
                    tuple(dataclasses.replace(self._sample(s), state="running") for s in samples),
                )
                logger.info("claimed step %s (%s), %s samples", job.step, job.path, len(samples))
                return claimed

    def _skip_older(self, conn: sqlite3.Connection, newest: CheckpointJob, now: float) -> None:
        """Backlog `latest`: pending checkpoints older than `newest` are skipped, finals kept."""
        if newest.step is None:
            condition, params = "step IS NOT NULL", ()
        else:
            condition, params = "step < ?", (newest.step,)
        ids = [
            int(r[0])
            for r in conn.execute(
                "SELECT id FROM checkpoints WHERE state = 'pending' AND is_final = 0 AND id != ? AND"
                f" {condition}",
                (newest.id, *params),
            )
        ]
        reason = "backlog: latest"
        for checkpoint_id in ids:
            conn.execute(
                "UPDATE checkpoints SET state = 'skipped', error = ?, updated_at = ? WHERE id = ?",
                (reason, now, checkpoint_id),
            )
            conn.execute(
                "UPDATE samples SET state = 'skipped', error = ?, updated_at = ? WHERE checkpoint_id = ?"
                " AND state = 'pending'",
                (reason, now, checkpoint_id),
            )
        if ids:
            logger.info("backlog latest: skipped %s older checkpoint(s) for step %s", len(ids), newest.step)

    def mark_sample_done(self, sample_id: int, *, output_path: Path, now: float) -> None:
        """A sample image is written (atomically, by the output module)."""
        with self._transaction() as conn:
            conn.execute(
                "UPDATE samples SET state = 'done', error = NULL, retry_at = NULL, output_path = ?,"
                " attempts = attempts + 1, updated_at = ? WHERE id = ?",
                (str(output_path), now, sample_id),
            )

    def mark_sample_failed(self, sample_id: int, error: str, *, transient: bool, now: float) -> State:
        """A sample failed; a transient error is retried later (bounded), returns its new state."""
        with self._transaction() as conn:
            row = conn.execute("SELECT attempts FROM samples WHERE id = ?", (sample_id,)).fetchone()
            if row is None:
                raise KeyError(f"no sample job with id {sample_id}")
            attempts = int(row[0]) + 1
            state: State
            if transient and attempts < self.max_attempts:
                state, retry_at = (
                    "pending",
                    now + retry_delay_seconds(attempts, base_seconds=self.retry_base_seconds),
                )
                message = f"attempt {attempts} of {self.max_attempts} failed, retrying: {error}"
            else:
                state, retry_at = "failed", None
                message = f"gave up after {attempts} attempts: {error}" if transient else error
            conn.execute(
                "UPDATE samples SET state = ?, attempts = ?, error = ?, retry_at = ?, updated_at = ?"
                " WHERE id = ?",
                (state, attempts, message, retry_at, now, sample_id),
            )
            logger.warning("sample job %s: %s", sample_id, message)
            return state

    def finish_checkpoint(self, checkpoint_id: int, *, now: float) -> CheckpointJob:
        """Close a claimed checkpoint: done, failed (every sample failed) or pending (retries due)."""
        with self._transaction() as conn:
            self._finish(conn, checkpoint_id, now)
            return self._get_checkpoint(conn, checkpoint_id)

    def _finish(self, conn: sqlite3.Connection, checkpoint_id: int, now: float) -> None:
        conn.execute(  # a sample the worker never reported is still to do
            "UPDATE samples SET state = 'pending', updated_at = ? WHERE checkpoint_id = ? AND state"
            " = 'running'",
            (now, checkpoint_id),
        )
        counts = dict(
            conn.execute(
                "SELECT state, COUNT(*) FROM samples WHERE checkpoint_id = ? GROUP BY state", (checkpoint_id,)
            ).fetchall()
        )
        pending, failed, done = counts.get("pending", 0), counts.get("failed", 0), counts.get("done", 0)
        if pending:
            retry_at = conn.execute(
                "SELECT MAX(COALESCE(retry_at, ?)) FROM samples WHERE checkpoint_id = ? AND state ="
                " 'pending'",
                (now, checkpoint_id),
            ).fetchone()[0]
            error = f"{pending} sample(s) to retry" + (f", {failed} failed" if failed else "")
            conn.execute(
                "UPDATE checkpoints SET state = 'pending', claimed_by = NULL, retry_at = ?, error = ?,"
                " updated_at = ? WHERE id = ?",
                (retry_at, error, now, checkpoint_id),
            )
            return
        if failed and not done:
            first = conn.execute(
                "SELECT error FROM samples WHERE checkpoint_id = ? AND state = 'failed' ORDER BY"
                " sample_index LIMIT 1",
                (checkpoint_id,),
            ).fetchone()[0]
            state, error = "failed", f"all {failed} samples failed; first: {first}"
        else:
            state, error = "done", (f"{failed} of {failed + done} samples failed" if failed else None)
        conn.execute(
            "UPDATE checkpoints SET state = ?, error = ?, claimed_by = NULL, retry_at = NULL,"
            " finished_at = ?,"
            " updated_at = ? WHERE id = ?",
            (state, error, now, now, checkpoint_id),
        )
        logger.info("checkpoint job %s %s%s", checkpoint_id, state, f": {error}" if error else "")

    def mark_checkpoint_failed(self, checkpoint_id: int, error: str, *, transient: bool, now: float) -> State:
        """The whole checkpoint failed (unreadable, LoRA does not apply, out of memory); new state.

        Transient errors retry after a doubling backoff until `max_attempts` claims;
        permanent ones are recorded and not retried until forced.
        """
        with self._transaction() as conn:
            job = self._get_checkpoint(conn, checkpoint_id)
            conn.execute(
                "UPDATE samples SET state = 'pending', updated_at = ? WHERE checkpoint_id = ? AND"
                " state = 'running'",
                (now, checkpoint_id),
            )
            attempts = max(job.attempts, 1)
            if transient and attempts < self.max_attempts:
                retry_at = now + retry_delay_seconds(attempts, base_seconds=self.retry_base_seconds)
                message = f"attempt {attempts} of {self.max_attempts} failed, retrying: {error}"
                conn.execute(
                    "UPDATE checkpoints SET state = 'pending', claimed_by = NULL, retry_at = ?, error = ?,"
                    " updated_at = ? WHERE id = ?",
                    (retry_at, message, now, checkpoint_id),
                )
                logger.warning("checkpoint job %s: %s", checkpoint_id, message)
                return "pending"
            message = f"gave up after {attempts} attempts: {error}" if transient else error
            self._fail_checkpoint(conn, checkpoint_id, message, now)
            logger.warning("checkpoint job %s failed: %s", checkpoint_id, message)
            return "failed"

    @staticmethod
    def _fail_checkpoint(conn: sqlite3.Connection, checkpoint_id: int, message: str, now: float) -> None:
        conn.execute(
            "UPDATE checkpoints SET state = 'failed', error = ?, claimed_by = NULL, retry_at = NULL,"
            " finished_at = ?, updated_at = ? WHERE id = ?",
            (message, now, now, checkpoint_id),
        )
        conn.execute(
            "UPDATE samples SET state = 'failed', error = ?, updated_at = ? WHERE checkpoint_id = ?"
            " AND state IN ('pending', 'running')",
            (f"checkpoint failed: {message}", now, checkpoint_id),
        )

    def force_render(
        self, step: int, *, now: float, requests: Sequence[SampleRequest] | None = None
    ) -> list[CheckpointJob]:
        """Render step `step` again (`sidecar render --step N --force`): its samples go back to pending.

        With `requests`, the samples are replaced by that plan (e.g. the current `sample:`
        section); without, the stored plan is rendered again. Raises `CheckpointError`
        when no checkpoint is recorded at that step.
        """
        with self._transaction() as conn:
            ids = [
                int(r[0])
                for r in conn.execute(
                    "SELECT id FROM checkpoints WHERE step = ? AND content_hash IS NOT NULL", (step,)
                )
            ]
            if not ids:
                known = [
                    str(r[0])
                    for r in conn.execute(
                        "SELECT DISTINCT step FROM checkpoints WHERE step IS NOT NULL ORDER BY step"
                    )
                ]
                raise CheckpointError(
                    f"no readable checkpoint recorded at step {step}; recorded steps:"
                    f" {', '.join(known) or 'none'}"
                )
            for checkpoint_id in ids:
                if requests is not None:
                    conn.execute("DELETE FROM samples WHERE checkpoint_id = ?", (checkpoint_id,))
                    self._insert_samples(conn, checkpoint_id, requests, "pending", None, now)
                else:
                    conn.execute(
                        "UPDATE samples SET state = 'pending', attempts = 0, error = NULL, retry_at = NULL,"
                        " output_path = NULL, updated_at = ? WHERE checkpoint_id = ?",
                        (now, checkpoint_id),
                    )
                conn.execute(
                    "UPDATE checkpoints SET state = 'pending', attempts = 0, interruptions = 0, error = NULL,"
                    " retry_at = NULL, claimed_by = NULL, finished_at = NULL, note = ?, updated_at ="
                    " ? WHERE id = ?",
                    (f"forced re-render at {now:.0f}", now, checkpoint_id),
                )
            logger.info("forced re-render of step %s (%s checkpoint(s))", step, len(ids))
            return [self._get_checkpoint(conn, i) for i in ids]

    # --- queries ------------------------------------------------------------------------

    def checkpoints(self, *, states: Sequence[State] | None = None) -> list[CheckpointJob]:
        """Checkpoint jobs in render order, optionally only those in `states`."""
        query = f"SELECT {_CHECKPOINT_COLUMNS} FROM checkpoints"
        params: tuple[object, ...] = ()
        if states:
            query += f" WHERE state IN ({', '.join('?' for _ in states)})"
            params = tuple(states)
        return [self._checkpoint(r) for r in self._conn.execute(f"{query} ORDER BY {_STEP_ORDER}", params)]

    def checkpoint(self, checkpoint_id: int) -> CheckpointJob:
        """One checkpoint job; KeyError if there is none with that id."""
        return self._get_checkpoint(self._conn, checkpoint_id)

    def samples(self, checkpoint_id: int) -> list[SampleJob]:
        """The sample jobs of one checkpoint, by index."""
        rows = self._conn.execute(
            f"SELECT {_SAMPLE_COLUMNS} FROM samples WHERE checkpoint_id = ? ORDER BY sample_index",
            (checkpoint_id,),
        )
        return [self._sample(r) for r in rows]

    def queue(self) -> list[CheckpointJob]:
        """Pending and running checkpoints, in the order `all` would render them."""
        return self.checkpoints(states=("pending", "running"))

    def last_rendered_step(self) -> int | None:
        """The highest step whose rendering is done, or None."""
        return self._conn.execute("SELECT MAX(step) FROM checkpoints WHERE state = 'done'").fetchone()[0]

    def failures(self) -> list[Failure]:
        """Failed checkpoints and failed samples of checkpoints that were otherwise rendered."""
        found = [
            Failure(int(i), step, Path(str(path)), None, str(error or "failed"))
            for i, step, path, error in self._conn.execute(
                f"SELECT id, step, path, error FROM checkpoints WHERE state = 'failed' ORDER BY {_STEP_ORDER}"
            )
        ]
        found += [
            Failure(int(i), step, Path(str(path)), int(index), str(error or "failed"))
            for i, step, path, index, error in self._conn.execute(
                "SELECT c.id, c.step, c.path, s.sample_index, s.error FROM samples s JOIN checkpoints c"
                " ON c.id = s.checkpoint_id WHERE s.state = 'failed' AND c.state != 'failed'"
                " ORDER BY c.step, s.sample_index"
            )
        ]
        return found

    def counts(self) -> tuple[dict[str, int], dict[str, int]]:
        """(checkpoints, samples) per state, every state present."""
        result = []
        for table in ("checkpoints", "samples"):
            per_state = dict.fromkeys(STATES, 0)
            per_state.update(
                self._conn.execute(f"SELECT state, COUNT(*) FROM {table} GROUP BY state").fetchall()
            )
            result.append(per_state)
        return result[0], result[1]

    def status(self) -> StatusSummary:
        """Everything `sidecar status` shows, read in one snapshot."""
        self._conn.execute("BEGIN")
        try:
            checkpoint_counts, sample_counts = self.counts()
            return StatusSummary(
                checkpoint_counts=checkpoint_counts,
                sample_counts=sample_counts,
                queue=tuple(self.queue()),
                last_rendered_step=self.last_rendered_step(),
                failures=tuple(self.failures()),
            )
        finally:
            self._conn.execute("COMMIT")
