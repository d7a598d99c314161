"""sidecar/intake/split.py: ai-toolkit's split Wan 2.2 files as one checkpoint, and the readiness
rule for them (`ReadinessTracker` with a fake clock: `now` is passed in, nothing sleeps).

The intake loop pairing them end to end is tests/app/test_intake_loop_split.py.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from sidecar.intake.layouts import Checkpoint, recognise
from sidecar.intake.readiness import ReadinessTracker
from sidecar.intake.split import SIBLING_GRACE_SECONDS, files_of, files_signature, recorded_as, sibling_of

SETTLE, ABANDON, GRACE = 1.0, 30.0, SIBLING_GRACE_SECONDS


def write_lora(path: Path, *, fill: float = 1.0) -> bytes:
    """A small real safetensors file; returns its bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"lora_down.weight": np.full((8, 4), fill, dtype=np.float32)}, str(path))
    return path.read_bytes()


def part(folder: Path, step: int, which: str) -> Checkpoint:
    found = recognise(folder / f"my_lora_{step:09d}_{which}_noise.safetensors", root=folder)
    assert found is not None and found.split == f"{which}_noise"
    return found


def tracker() -> ReadinessTracker:
    return ReadinessTracker(settle_seconds=SETTLE, abandon_seconds=ABANDON)


# --- which file a step is recorded under ----------------------------------------------------------


def test_the_sibling_of_each_part_is_the_other_part_of_the_same_step(tmp_path: Path) -> None:
    high, low = part(tmp_path, 500, "high"), part(tmp_path, 500, "low")
    assert sibling_of(high) == low and sibling_of(low) == high
    assert sibling_of(recognise(tmp_path / "my_lora_000000500.safetensors", root=tmp_path)) is None  # type: ignore[arg-type]


def test_a_step_is_recorded_under_its_high_noise_file_or_the_part_already_taken(tmp_path: Path) -> None:
    high, low = part(tmp_path, 500, "high"), part(tmp_path, 500, "low")
    nothing_taken = {"taken": lambda path: False}
    write_lora(low.path)
    assert recorded_as(low, **nothing_taken) == low  # a run training the low-noise expert only
    assert files_of(low) == (low.path,)
    write_lora(high.path)
    assert recorded_as(low, **nothing_taken) == high  # ai-toolkit wrote the high-noise file first
    assert recorded_as(high, **nothing_taken) == high
    assert files_of(high) == (high.path, low.path)
    # A part whose sibling is tracked or recorded already joins it, whichever it is.
    assert recorded_as(high, taken=lambda path: path == low.path) == low
    assert recorded_as(low, taken=lambda path: path == low.path) == low


def test_the_signature_of_a_split_checkpoint_covers_both_files(tmp_path: Path) -> None:
    high = part(tmp_path, 500, "high")
    write_lora(high.path)
    os.utime(high.path, ns=(2_000_000_000, 2_000_000_000))
    alone = files_signature(high)
    assert alone == (high.path.stat().st_size, 2_000_000_000)
    low = part(tmp_path, 500, "low")
    write_lora(low.path, fill=2.0)
    os.utime(low.path, ns=(1_000_000_000, 1_000_000_000))
    assert files_signature(high) == (alone[0] + low.path.stat().st_size, 2_000_000_000)
    assert files_signature(high) == files_signature(recorded_as(low, taken=lambda path: False))
    os.utime(low.path, ns=(3_000_000_000, 3_000_000_000))  # the low-noise file rewritten
    assert files_signature(high) != (alone[0] + low.path.stat().st_size, 2_000_000_000)
    high.path.unlink()
    assert files_signature(high) is None


# --- readiness: both parts, or one alone after the grace --------------------------------------


def test_the_low_noise_file_written_after_the_high_one_makes_one_ready_checkpoint(tmp_path: Path) -> None:
    high, low = part(tmp_path, 500, "high"), part(tmp_path, 500, "low")
    readiness = tracker()
    write_lora(high.path)
    readiness.observe(high, 0.0, closed=True)
    assert readiness.poll(0.0) == []  # whole and closed, but alone: its sibling may follow
    assert readiness.waiting() == [
        (high.path, f"whole, waiting for its sibling {low.path.name} (0.0 of {GRACE:g} s)")
    ]
    data = write_lora(low.path, fill=2.0)
    low.path.write_bytes(data[: len(data) // 2])  # being written
    readiness.observe(high, 0.2)  # the intake observes the step's checkpoint for either file's event
    assert readiness.poll(0.2) == []
    assert f"not whole yet: {low.path.name}: " in readiness.waiting()[0][1]
    low.path.write_bytes(data)
    readiness.observe(high, 0.4, closed=True)

    (event,) = readiness.poll(0.4)

    assert (event.checkpoint, event.state) == (high, "ready")
    assert event.siblings == ((low.path, (len(data), low.path.stat().st_mtime_ns)),)
    assert (event.size, event.mtime_ns) == (high.path.stat().st_size, high.path.stat().st_mtime_ns)
    assert low.path.name in event.reason and len(readiness) == 0


def test_a_part_alone_is_ready_after_the_grace_and_a_run_that_wrote_pairs_waits_longer(
    tmp_path: Path,
) -> None:
    readiness = tracker()
    first = part(tmp_path, 500, "high")
    write_lora(first.path)
    readiness.observe(first, 0.0, closed=True)
    assert readiness.poll(GRACE - 0.1) == []
    (event,) = readiness.poll(GRACE)
    assert event.state == "ready" and event.siblings == ()
    assert f"no sibling {sibling_of(first).path.name} after {GRACE:.0f} s: high_noise alone" in event.reason  # type: ignore[union-attr]

    # The run writes a pair at step 750: from then on a lone part waits `abandon_seconds` for its sibling.
    pair = part(tmp_path, 750, "high"), part(tmp_path, 750, "low")
    for checkpoint in pair:
        write_lora(checkpoint.path)
    readiness.observe(pair[0], 20.0, closed=True)
    assert [event.siblings[0][0] for event in readiness.poll(20.0)] == [pair[1].path]
    lone = part(tmp_path, 1000, "high")
    write_lora(lone.path)
    readiness.observe(lone, 30.0, closed=True)
    assert readiness.poll(30.0 + GRACE) == []
    assert "this run wrote pairs before" in readiness.waiting()[0][1]
    assert [event.state for event in readiness.poll(30.0 + ABANDON)] == ["ready"]


def test_a_part_found_long_after_it_was_written_does_not_wait_again(tmp_path: Path) -> None:
    """The grace counts from the file's last write: at startup, a one-expert run's old steps are
    ready as soon as they are settled."""
    readiness = tracker()
    low = part(tmp_path, 500, "low")
    write_lora(low.path)
    written = 1_700_000_000.0
    os.utime(low.path, (written, written))
    readiness.observe(low, written + GRACE, closed=True)  # found by the startup scan
    (event,) = readiness.poll(written + GRACE)
    assert event.state == "ready" and event.checkpoint == low


@pytest.mark.parametrize("damage", ["truncated", "corrupt"])
def test_a_damaged_sibling_fails_the_whole_step_naming_that_file(tmp_path: Path, damage: str) -> None:
    high, low = part(tmp_path, 500, "high"), part(tmp_path, 500, "low")
    write_lora(high.path)
    data = write_lora(low.path)
    low.path.write_bytes(data[:-10] if damage == "truncated" else (10**12).to_bytes(8, "little") + data[8:])
    readiness = tracker()
    readiness.observe(high, 0.0)

    (event,) = readiness.poll(ABANDON)

    assert (event.checkpoint, event.state) == (high, "abandoned")
    expected = "truncated for good" if damage == "truncated" else "corrupt"
    assert event.reason.startswith(f"{expected}: {low.path.name}: ")
