"""The job store's schema, with its version, and the migrations from every older version.

`PRAGMA user_version` holds the version. Opening a store migrates an older one step by
step inside one transaction, and refuses one written by a newer sidecar: its rows may
mean things this version does not know, and rewriting them would lose that.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable

from sidecar.errors import SidecarError

SCHEMA_VERSION = 3

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
    updated_at REAL NOT NULL,
    output_json TEXT
)"""
# v3: content is no identity (a trainer may save equal bytes at two steps); looked up, not unique.
CREATE_CHECKPOINTS_HASH = (
    "CREATE INDEX IF NOT EXISTS checkpoints_by_content ON checkpoints (content_hash) "
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


def _v1_to_v2(conn: sqlite3.Connection) -> None:
    """v2 stores the plan's output options (image format, batch size) with each checkpoint,
    so a step queued before a config edit is published as it was planned."""
    conn.execute("ALTER TABLE checkpoints ADD COLUMN output_json TEXT")


def _v2_to_v3(conn: sqlite3.Connection) -> None:
    """v3 identifies a checkpoint by its path and step, not its content: a file whose bytes equal
    an earlier step's gets a row (and a step in the samples folder) of its own. The unique
    index on the content hash goes; a plain one (made by the DDL) serves the lookups."""
    conn.execute("DROP INDEX IF EXISTS checkpoints_content_hash")


# MIGRATIONS[v] turns a store of version v into version v + 1.
MIGRATIONS: dict[int, Callable[[sqlite3.Connection], None]] = {1: _v1_to_v2, 2: _v2_to_v3}


def create_or_migrate(conn: sqlite3.Connection, *, path: object) -> int:
    """Bring the schema of an open connection (inside a transaction) to `SCHEMA_VERSION`.

    Returns the version found (0 for a new store). Raises `SidecarError` for a store
    written by a newer sidecar.
    """
    found = int(conn.execute("PRAGMA user_version").fetchone()[0])
    has_tables = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'checkpoints'"
    ).fetchone()
    if found > SCHEMA_VERSION:
        raise SidecarError(
            f"{path}: the job store has schema version {found}, written by a newer sidecar; this one "
            f"reads up to version {SCHEMA_VERSION}. Upgrade sidecar, or use another `--output`"
        )
    if has_tables and found == 0:
        found = 1  # version 1 stores written before the version was checked
    if not has_tables:
        for statement in DDL:
            conn.execute(statement)
    else:
        for version in range(found, SCHEMA_VERSION):
            MIGRATIONS[version](conn)
        for statement in DDL:  # indexes added since are created too
            conn.execute(statement)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
    return found if has_tables else 0
