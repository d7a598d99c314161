"""The job store's rows as Python values: checkpoints and samples, and what `status` shows."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from sidecar.plan.request import SampleRequest

State = Literal["pending", "running", "done", "failed", "skipped"]
STATES: tuple[State, ...] = ("pending", "running", "done", "failed", "skipped")

CHECKPOINT_COLUMNS = (
    "id, path, step, epoch, size_bytes, mtime_ns, content_hash, layout, is_final, state, attempts, "
    "interruptions, error, note, retry_at, added_at, started_at, finished_at, output_json"
)
SAMPLE_COLUMNS = (
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
    output: dict[str, Any] | None = None  # the plan's output options when it was added (format, batch)


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
    notes: tuple[CheckpointJob, ...] = ()  # latest with a note (identical bytes, rewritten), oldest first


def identical_note(step: int | None, path: Path) -> str:
    """The note of a checkpoint whose bytes equal those of an earlier one (`step`, `path`)."""
    return (
        f"same bytes as step {step} ({path.name}); its samples rendered with the same settings are "
        "hard links of that step's images, not rendered again"
    )


def request_fingerprint(request: SampleRequest) -> str:
    """A short stable hash of every setting of a request: equal settings, equal fingerprint."""
    canonical = json.dumps(request.to_dict(), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


def checkpoint_from_row(row: Sequence[object]) -> CheckpointJob:
    """A row selected with `CHECKPOINT_COLUMNS`, in field order."""
    *fields, output_json = row
    job = CheckpointJob(*fields, output=json.loads(str(output_json)) if output_json else None)  # type: ignore[arg-type]
    return dataclasses.replace(job, path=Path(str(job.path)), is_final=bool(job.is_final))


def sample_from_row(row: Sequence[object]) -> SampleJob:
    """A row selected with `SAMPLE_COLUMNS`."""
    id_, checkpoint_id, index, fingerprint, request_json, state, attempts, error, retry_at, output = row
    return SampleJob(
        id=int(id_),  # type: ignore[arg-type]
        checkpoint_id=int(checkpoint_id),  # type: ignore[arg-type]
        index=int(index),  # type: ignore[arg-type]
        fingerprint=str(fingerprint),
        request=SampleRequest.from_dict(json.loads(str(request_json))),
        state=state,  # type: ignore[arg-type]
        attempts=int(attempts),  # type: ignore[arg-type]
        error=error,  # type: ignore[arg-type]
        retry_at=retry_at,  # type: ignore[arg-type]
        output_path=Path(str(output)) if output is not None else None,
    )


def sample_row_values(
    checkpoint_id: int, request: SampleRequest, state: State, error: str | None, now: float
) -> tuple[Any, ...]:
    """The values of a new sample row, in the order `INSERT_SAMPLE` names them."""
    return (
        checkpoint_id,
        request.index,
        request_fingerprint(request),
        json.dumps(request.to_dict()),
        state,
        error,
        now,
    )


INSERT_SAMPLE = (
    "INSERT INTO samples (checkpoint_id, sample_index, fingerprint, request_json, state, error, updated_at)"
    " VALUES (?, ?, ?, ?, ?, ?, ?)"
)


def output_json(output: Mapping[str, Any] | None) -> str | None:
    return json.dumps(dict(output), sort_keys=True) if output is not None else None
