"""Pure rules of the job store: which checkpoints render (`sample_every`), and retry timing."""

from __future__ import annotations

MAX_ATTEMPTS = 3  # renders of one checkpoint (or sample) before a transient error becomes final
RETRY_BASE_SECONDS = 30.0  # first backoff; doubles per attempt
MAX_INTERRUPTIONS = 3  # process deaths while rendering one checkpoint before it is failed
WRITE_RETRY_BASE_SECONDS = 10.0  # samples could not be written (disk full): first wait; doubles
WRITE_RETRY_MAX_SECONDS = 300.0  # ... up to this, however long the disk stays full


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


def write_retry_delay_seconds(failures: int) -> float:
    """Wait before rendering again after `failures` renders in a row could not write their samples.

    Unbounded in count (the disk may take hours to free), bounded in length: the daemon
    resumes within `WRITE_RETRY_MAX_SECONDS` of space returning.
    """
    return min(retry_delay_seconds(failures, base_seconds=WRITE_RETRY_BASE_SECONDS), WRITE_RETRY_MAX_SECONDS)
