"""sidecar/jobs/policy.py: which checkpoints render under `sample_every`, and the retry backoff."""

from __future__ import annotations

import pytest

from sidecar.jobs.policy import (
    MAX_ATTEMPTS,
    MAX_INTERRUPTIONS,
    RETRY_BASE_SECONDS,
    retry_delay_seconds,
    skip_reason,
)


@pytest.mark.parametrize(
    ("step", "every", "final", "first", "skipped"),
    [
        (200, 100, False, False, False),
        (250, 100, False, False, True),
        (250, 100, True, False, False),
        (50, 100, False, True, False),
        (None, 100, False, False, False),
        (250, None, False, False, False),
        (7, 1, False, False, False),
    ],
)
def test_skip_reason_policy(
    step: int | None, every: int | None, final: bool, first: bool, skipped: bool
) -> None:
    reason = skip_reason(step, sample_every=every, is_final=final, is_first=first)
    assert (reason is not None) == skipped
    if skipped:
        assert reason == f"sample_every: step {step} is not a multiple of {every}"


def test_skip_reason_rejects_bad_sample_every() -> None:
    with pytest.raises(ValueError, match="`sample_every` must be a positive integer"):
        skip_reason(100, sample_every=0, is_final=False, is_first=False)


def test_retry_delay_doubles() -> None:
    assert [retry_delay_seconds(n, base_seconds=30.0) for n in (1, 2, 3)] == [30.0, 60.0, 120.0]
    assert retry_delay_seconds(0, base_seconds=30.0) == 30.0  # never less than the base
    assert retry_delay_seconds(1) == RETRY_BASE_SECONDS


def test_default_bounds() -> None:
    """Three tries, three process deaths, 30 s first backoff (the store's messages name them)."""
    assert (MAX_ATTEMPTS, MAX_INTERRUPTIONS, RETRY_BASE_SECONDS) == (3, 3, 30.0)
