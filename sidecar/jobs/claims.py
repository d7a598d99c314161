"""The job store's state changes while rendering: recover, claim, mark, finish, fail, force.

A claim is one `BEGIN IMMEDIATE` transaction, so two processes never claim the same
checkpoint. Rows left `running` by an owner whose lock is free (the process died, even
by `kill -9`) go back to `pending` (`recover`); a checkpoint whose process died
`MAX_INTERRUPTIONS` times is failed, not retried forever.
"""

from __future__ import annotations

import dataclasses
import logging
import sqlite3
from collections.abc import Sequence
from pathlib import Path

from sidecar.errors import CheckpointError
from sidecar.jobs.locks import OwnerLock
from sidecar.jobs.policy import MAX_INTERRUPTIONS, retry_delay_seconds
from sidecar.jobs.queries import NEWEST_FIRST, STEP_ORDER, JobQueries
from sidecar.jobs.records import (
    CHECKPOINT_COLUMNS,
    SAMPLE_COLUMNS,
    CheckpointJob,
    ClaimedCheckpoint,
    State,
    checkpoint_from_row,
    sample_from_row,
)
from sidecar.plan.request import SampleRequest
from sidecar.settings import BACKLOG_POLICIES, Backlog

logger = logging.getLogger("sidecar.jobs")


class JobClaims(JobQueries):
    """What the dispatcher does to rows; the owner lock and retry settings come from `JobStore`."""

    _lock: OwnerLock
    _owners: Path
    max_attempts: int
    retry_base_seconds: float

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
        dead = [o for o in owners if o != self._lock.token and not OwnerLock.is_alive(self._owners, o)]
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
                        f"SELECT {CHECKPOINT_COLUMNS} FROM checkpoints WHERE {due} ORDER BY"
                        f" {NEWEST_FIRST} LIMIT 1",
                        (now,),
                    ).fetchone()
                    if row is not None:
                        self._skip_older(conn, checkpoint_from_row(row), now)
                else:
                    row = conn.execute(
                        f"SELECT {CHECKPOINT_COLUMNS} FROM checkpoints WHERE {due} ORDER BY"
                        f" {STEP_ORDER} LIMIT 1",
                        (now,),
                    ).fetchone()
                if row is None:
                    return None
                job = checkpoint_from_row(row)
                samples = conn.execute(
                    f"SELECT {SAMPLE_COLUMNS} FROM samples WHERE checkpoint_id = ? AND state = 'pending'"
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
                    tuple(dataclasses.replace(sample_from_row(s), state="running") for s in samples),
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

    def release_claim(
        self, checkpoint_id: int, *, now: float, retry_at: float | None = None, reason: str | None = None
    ) -> CheckpointJob:
        """Give a claimed checkpoint back, untouched and without costing an attempt.

        For what is no fault of the checkpoint: the slot was taken between the gate's answer
        and the render, the disk is full. Samples done stay done; the rest wait for
        `retry_at` (None: at once), with `reason` shown in `sidecar status`.
        """
        with self._transaction() as conn:
            conn.execute(
                "UPDATE samples SET state = 'pending', updated_at = ? WHERE checkpoint_id = ?"
                " AND state = 'running'",
                (now, checkpoint_id),
            )
            conn.execute(
                "UPDATE checkpoints SET state = 'pending', attempts = MAX(attempts - 1, 0),"
                " claimed_by = NULL, retry_at = ?, error = ?, updated_at = ?"
                " WHERE id = ? AND state = 'running'",
                (retry_at, reason, now, checkpoint_id),
            )
            return self._get_checkpoint(conn, checkpoint_id)

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
