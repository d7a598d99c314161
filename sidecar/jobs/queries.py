"""Reading the job store, and the plumbing every part of it shares (connection, transaction, rows)."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator, Sequence
from pathlib import Path

from sidecar.jobs.records import (
    CHECKPOINT_COLUMNS,
    INSERT_SAMPLE,
    SAMPLE_COLUMNS,
    STATES,
    CheckpointJob,
    Failure,
    SampleJob,
    State,
    StatusSummary,
    checkpoint_from_row,
    sample_from_row,
    sample_row_values,
)
from sidecar.plan.request import SampleRequest

# Oldest step first; a checkpoint without a known step (a final file) after all others.
STEP_ORDER = "CASE WHEN step IS NULL THEN 1 ELSE 0 END, step, id"
NEWEST_FIRST = "CASE WHEN step IS NULL THEN 0 ELSE 1 END, step DESC, id DESC"
NOTES_SHOWN = 20  # `sidecar status` lists this many of the latest notes


class JobQueries:
    """The store's connection and its read-only queries; `JobStore` adds the writes."""

    _conn: sqlite3.Connection

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
    def _get_checkpoint(conn: sqlite3.Connection, checkpoint_id: int) -> CheckpointJob:
        row = conn.execute(
            f"SELECT {CHECKPOINT_COLUMNS} FROM checkpoints WHERE id = ?", (checkpoint_id,)
        ).fetchone()
        if row is None:
            raise KeyError(f"no checkpoint job with id {checkpoint_id}")
        return checkpoint_from_row(row)

    @staticmethod
    def _insert_samples(
        conn: sqlite3.Connection,
        checkpoint_id: int,
        requests: Sequence[SampleRequest],
        state: State,
        error: str | None,
        now: float,
    ) -> None:
        conn.executemany(
            INSERT_SAMPLE, [sample_row_values(checkpoint_id, r, state, error, now) for r in requests]
        )

    def checkpoints(self, *, states: Sequence[State] | None = None) -> list[CheckpointJob]:
        """Checkpoint jobs in render order, optionally only those in `states`."""
        query = f"SELECT {CHECKPOINT_COLUMNS} FROM checkpoints"
        params: tuple[object, ...] = ()
        if states:
            query += f" WHERE state IN ({', '.join('?' for _ in states)})"
            params = tuple(states)
        return [checkpoint_from_row(r) for r in self._conn.execute(f"{query} ORDER BY {STEP_ORDER}", params)]

    def checkpoint(self, checkpoint_id: int) -> CheckpointJob:
        """One checkpoint job; KeyError if there is none with that id."""
        return self._get_checkpoint(self._conn, checkpoint_id)

    def samples(self, checkpoint_id: int) -> list[SampleJob]:
        """The sample jobs of one checkpoint, by index."""
        rows = self._conn.execute(
            f"SELECT {SAMPLE_COLUMNS} FROM samples WHERE checkpoint_id = ? ORDER BY sample_index",
            (checkpoint_id,),
        )
        return [sample_from_row(r) for r in rows]

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
                f"SELECT id, step, path, error FROM checkpoints WHERE state = 'failed' ORDER BY {STEP_ORDER}"
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
                notes=tuple(self.noted()),
            )
        finally:
            self._conn.execute("COMMIT")

    def identical_done_samples(self, checkpoint_id: int) -> dict[int, Path]:
        """`{sample index: image}` of samples another checkpoint with the same bytes already rendered
        with the same settings (fingerprint): the images this checkpoint's samples would be."""
        rows = self._conn.execute(
            "SELECT s.sample_index, o.output_path FROM checkpoints c"
            " JOIN checkpoints oc ON oc.content_hash = c.content_hash AND oc.id != c.id"
            " JOIN samples s ON s.checkpoint_id = c.id"
            " JOIN samples o ON o.checkpoint_id = oc.id AND o.fingerprint = s.fingerprint"
            " AND o.sample_index = s.sample_index"
            " WHERE c.id = ? AND o.state = 'done' AND o.output_path IS NOT NULL"
            " ORDER BY s.sample_index, oc.id",
            (checkpoint_id,),
        )
        found: dict[int, Path] = {}
        for index, output_path in rows:
            found.setdefault(int(index), Path(str(output_path)))
        return found

    def content_needed(self, content_hash: str) -> bool:
        """Whether a checkpoint still to render has these bytes (its cached copy must stay)."""
        row = self._conn.execute(
            "SELECT 1 FROM checkpoints WHERE content_hash = ? AND state IN ('pending', 'running') LIMIT 1",
            (content_hash,),
        ).fetchone()
        return row is not None

    def noted(self, *, limit: int = NOTES_SHOWN) -> list[CheckpointJob]:
        """The latest checkpoints with a note (identical bytes, rewritten in place, forced), oldest first."""
        rows = self._conn.execute(
            f"SELECT {CHECKPOINT_COLUMNS} FROM checkpoints WHERE note IS NOT NULL"
            " ORDER BY updated_at DESC, id DESC LIMIT ?",
            (limit,),
        ).fetchall()
        return [checkpoint_from_row(r) for r in reversed(rows)]

    def failed_since(self, since: float) -> int:
        """Checkpoints that failed at or after `since` (a run's start: its exit code)."""
        row = self._conn.execute(
            "SELECT COUNT(*) FROM checkpoints WHERE state = 'failed' AND finished_at >= ?", (since,)
        ).fetchone()
        return int(row[0])
