"""sidecar/jobs/schema.py: stores of older versions are migrated with their rows; newer ones refused."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
from factories import sample_request

from sidecar.errors import SidecarError
from sidecar.intake.layouts import Checkpoint
from sidecar.jobs.records import request_fingerprint
from sidecar.jobs.schema import SCHEMA_VERSION, create_or_migrate
from sidecar.jobs.store import JobStore

# The schema of version 1 (sidecar/jobs.py before the stage layout), as a v1 sidecar wrote it.
V1_DDL = (
    """
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
)""",
    "CREATE UNIQUE INDEX IF NOT EXISTS checkpoints_content_hash ON checkpoints (content_hash) "
    "WHERE content_hash IS NOT NULL",
    "CREATE UNIQUE INDEX IF NOT EXISTS checkpoints_path_step ON checkpoints (path, COALESCE(step, -1))",
    "CREATE INDEX IF NOT EXISTS checkpoints_state_step ON checkpoints (state, step)",
    """
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
)""",
    "CREATE INDEX IF NOT EXISTS samples_checkpoint_state ON samples (checkpoint_id, state)",
)

REQUESTS = [sample_request(index=0), sample_request(index=1, prompt="a photo of sks dog, at night", seed=43)]


def write_v1_store(db: Path, *, user_version: int | None = 1) -> None:
    """A version-1 store: a rendered checkpoint at step 100 and a pending one at step 200.

    `user_version=None` leaves the version unset, as the first v1 releases did.
    """
    db.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(db)
    with conn:
        for statement in V1_DDL:
            conn.execute(statement)
        for step, state in ((100, "done"), (200, "pending")):
            cursor = conn.execute(
                "INSERT INTO checkpoints (path, step, size_bytes, mtime_ns, content_hash, layout, state,"
                " added_at, updated_at) VALUES (?, ?, 1000, 1, ?, 'ai-toolkit', ?, 1.0, 1.0)",
                (f"/runs/out/my_lora_{step:09d}.safetensors", step, f"hash-{step}", state),
            )
            for request in REQUESTS:
                conn.execute(
                    "INSERT INTO samples (checkpoint_id, sample_index, fingerprint, request_json, state,"
                    " output_path, updated_at) VALUES (?, ?, ?, ?, ?, ?, 1.0)",
                    (
                        cursor.lastrowid,
                        request.index,
                        request_fingerprint(request),
                        json.dumps(request.to_dict()),
                        state,
                        f"/out/{step}/{request.index}.png" if state == "done" else None,
                    ),
                )
        if user_version is not None:
            conn.execute(f"PRAGMA user_version = {user_version}")
    conn.close()


def user_version(db: Path) -> int:
    conn = sqlite3.connect(db)
    try:
        return int(conn.execute("PRAGMA user_version").fetchone()[0])
    finally:
        conn.close()


def checkpoint_columns(db: Path) -> list[str]:
    conn = sqlite3.connect(db)
    try:
        return [row[1] for row in conn.execute("PRAGMA table_info(checkpoints)")]
    finally:
        conn.close()


def add_step_300(store: JobStore, *, content_hash: str, output: dict | None = None):
    """A checkpoint at step 300 added to a migrated store."""
    return store.add_checkpoint(
        Checkpoint(Path("/runs/out/my_lora_000000300.safetensors"), "my_lora", "ai-toolkit", 300),
        content_hash=content_hash,
        size_bytes=1000,
        mtime_ns=1,
        requests=REQUESTS,
        now=4.0,
        output=output,
    )


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "samples" / ".sidecar" / "jobs.sqlite3"


def test_schema_version_is_3() -> None:
    assert SCHEMA_VERSION == 3


def write_v2_store(db: Path) -> None:
    """A version-2 store: the v1 schema plus `output_json`, content hashes unique."""
    write_v1_store(db, user_version=None)
    conn = sqlite3.connect(db)
    with conn:
        conn.execute("ALTER TABLE checkpoints ADD COLUMN output_json TEXT")
        conn.execute("PRAGMA user_version = 2")
    conn.close()


def index_names(db: Path) -> set[str]:
    conn = sqlite3.connect(db)
    try:
        return {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    finally:
        conn.close()


def test_a_version_2_store_is_migrated_and_then_takes_equal_bytes_at_another_step(db: Path) -> None:
    write_v2_store(db)
    assert "checkpoints_content_hash" in index_names(db)

    with JobStore(db, now=2.0) as store:
        assert user_version(db) == SCHEMA_VERSION
        assert "checkpoints_content_hash" not in index_names(db)  # content no longer unique
        assert [(c.step, c.state) for c in store.checkpoints()] == [(100, "done"), (200, "pending")]
        again = add_step_300(store, content_hash="hash-100")  # a trainer saved step 100's bytes again
        assert again.step == 300 and again.state == "pending"
        assert again.note is not None and "same bytes as step 100" in again.note
        linked = {0: Path("/out/100/0.png"), 1: Path("/out/100/1.png")}
        assert store.identical_done_samples(again.id) == linked
        assert [c.step for c in store.checkpoints()] == [100, 200, 300]


@pytest.mark.parametrize("written_version", [1, None], ids=["v1", "v1-unversioned"])
def test_a_version_1_store_is_migrated_with_its_rows_intact_and_claimable(
    db: Path, written_version: int | None
) -> None:
    write_v1_store(db, user_version=written_version)

    with JobStore(db, now=2.0) as store:
        assert user_version(db) == SCHEMA_VERSION
        done, pending = store.checkpoints()
        assert [(c.step, c.state, c.content_hash) for c in (done, pending)] == [
            (100, "done", "hash-100"),
            (200, "pending", "hash-200"),
        ]
        assert done.output is None and pending.output is None  # added before v2 stored output options
        assert [s.request for s in store.samples(done.id)] == REQUESTS
        assert [s.output_path for s in store.samples(done.id)] == [
            Path("/out/100/0.png"),
            Path("/out/100/1.png"),
        ]
        assert store.last_rendered_step() == 100

        claimed = store.claim_next_checkpoint(3.0)
        assert claimed is not None
        assert (claimed.checkpoint.id, claimed.checkpoint.step, claimed.checkpoint.output) == (
            pending.id,
            200,
            None,
        )
        assert [s.request for s in claimed.samples] == REQUESTS
        for sample in claimed.samples:
            store.mark_sample_done(sample.id, output_path=Path(f"/out/200/{sample.index}.png"), now=3.0)
        assert store.finish_checkpoint(pending.id, now=3.0).state == "done"


def test_a_migrated_store_takes_new_rows_with_their_output_options(db: Path) -> None:
    write_v1_store(db)
    with JobStore(db) as store:
        added = add_step_300(store, content_hash="hash-300", output={"image_format": "jpg", "batch_size": 2})
        assert added.output == {"image_format": "jpg", "batch_size": 2}
        assert [c.output for c in store.checkpoints()] == [None, None, added.output]


def test_migrating_again_is_a_no_op(db: Path) -> None:
    write_v1_store(db)
    JobStore(db).close()
    with JobStore(db) as reopened:
        assert user_version(db) == SCHEMA_VERSION
        assert [c.step for c in reopened.checkpoints()] == [100, 200]


def test_create_or_migrate_reports_the_version_it_found(tmp_path: Path) -> None:
    fresh = sqlite3.connect(tmp_path / "fresh.sqlite3", isolation_level=None)
    assert create_or_migrate(fresh, path="fresh") == 0
    assert fresh.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert create_or_migrate(fresh, path="fresh") == SCHEMA_VERSION
    fresh.close()
    old = tmp_path / "old.sqlite3"
    write_v1_store(old)
    conn = sqlite3.connect(old, isolation_level=None)
    assert create_or_migrate(conn, path=old) == 1
    conn.close()
    assert checkpoint_columns(old)[-1] == "output_json"
    assert user_version(old) == SCHEMA_VERSION


def test_a_store_from_a_newer_sidecar_is_refused_and_left_alone(db: Path) -> None:
    write_v1_store(db, user_version=SCHEMA_VERSION + 1)
    with pytest.raises(SidecarError) as caught:
        JobStore(db)
    message = str(caught.value)
    assert message.startswith(f"{db}: the job store has schema version {SCHEMA_VERSION + 1}")
    assert "written by a newer sidecar" in message
    assert f"this one reads up to version {SCHEMA_VERSION}" in message
    assert user_version(db) == SCHEMA_VERSION + 1  # not rewritten
    assert "output_json" not in checkpoint_columns(db)
    assert list((db.parent / f"{db.name}.owners").iterdir()) == []  # the refused open released its lock
