"""sidecar/intake/readiness.py: is a file whole now, and when is a checkpoint written in place ready."""

from __future__ import annotations

import json
import os
import re
import struct
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from sidecar.intake.layouts import Checkpoint, recognise
from sidecar.intake.readiness import ReadinessTracker, completeness
from sidecar.settings import ABANDON_SECONDS, SETTLE_SECONDS
from sidecar.weights import MAX_HEADER_BYTES


def write_lora(path: Path, *, metadata: dict[str, str] | None = None, rows: int = 64) -> bytes:
    """A small real safetensors file; returns its bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {
        "lora_unet_down.lora_down.weight": np.ones((rows, 16), dtype=np.float32),
        "lora_unet_down.lora_up.weight": np.zeros((16, rows), dtype=np.float32),
        "lora_unet_down.alpha": np.array(8.0, dtype=np.float32),
    }
    save_file(tensors, str(path), metadata=metadata)
    return path.read_bytes()


# --- completeness ----------------------------------------------------------------------------------


def test_whole_file_is_whole_with_its_size_and_mtime(tmp_path: Path) -> None:
    path = tmp_path / "a.safetensors"
    write_lora(path)
    check = completeness(path)
    assert check.whole and check.exists
    assert check.size == path.stat().st_size
    assert check.mtime_ns == path.stat().st_mtime_ns
    assert check.reason == f"whole: 3 tensors, {check.size} bytes"


def test_truncated_file_is_not_whole_and_says_by_how_much(tmp_path: Path) -> None:
    path = tmp_path / "a.safetensors"
    data = write_lora(path)
    path.write_bytes(data[: len(data) // 2])
    check = completeness(path)
    assert not check.whole
    assert re.search(r"header says \d+ bytes of data, file has \d+", check.reason)


def test_cut_inside_the_header_is_not_whole(tmp_path: Path) -> None:
    path = tmp_path / "a.safetensors"
    data = write_lora(path)
    path.write_bytes(data[:20])
    check = completeness(path)
    assert not check.whole
    assert "header says it is" in check.reason
    path.write_bytes(data[:5])
    assert "fewer than the 8-byte header length" in completeness(path).reason


def test_zero_byte_file(tmp_path: Path) -> None:
    path = tmp_path / "a.safetensors"
    path.write_bytes(b"")
    check = completeness(path)
    assert not check.whole
    assert "empty" in check.reason


def test_garbage_header(tmp_path: Path) -> None:
    path = tmp_path / "a.safetensors"
    body = b"this is not json at all"
    path.write_bytes(struct.pack("<Q", len(body)) + body)
    check = completeness(path)
    assert not check.whole
    assert "not JSON" in check.reason


def test_huge_header_length_is_refused_without_allocating(tmp_path: Path) -> None:
    path = tmp_path / "a.safetensors"
    path.write_bytes(struct.pack("<Q", 2**40) + b"{}")
    tracemalloc.start()
    try:
        check = completeness(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1024 * 1024  # the declared 1 TiB header was never asked for
    assert not check.whole
    assert str(MAX_HEADER_BYTES) in check.reason


def test_offsets_out_of_range(tmp_path: Path) -> None:
    path = tmp_path / "a.safetensors"
    header = json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 8)
    check = completeness(path)
    assert not check.whole
    assert "out of range" in check.reason


def test_trailing_bytes_are_not_whole(tmp_path: Path) -> None:
    path = tmp_path / "a.safetensors"
    data = write_lora(path)
    path.write_bytes(data + b"\0" * 16)
    check = completeness(path)
    assert not check.whole
    assert check.reason == f"header and data declare {len(data)} bytes, file has {len(data) + 16}"


def test_growing_file_is_never_whole_until_the_last_byte(tmp_path: Path) -> None:
    path = tmp_path / "a.safetensors"
    data = write_lora(path)
    for cut in range(0, len(data), max(1, len(data) // 37)):
        path.write_bytes(data[:cut])
        assert not completeness(path).whole, cut
    path.write_bytes(data)
    assert completeness(path).whole


def test_missing_file(tmp_path: Path) -> None:
    check = completeness(tmp_path / "gone.safetensors")
    assert not check.exists
    assert not check.whole
    assert (check.size, check.mtime_ns) == (-1, -1)


def test_pickle_file_is_whole_by_size_only(tmp_path: Path) -> None:
    path = tmp_path / "a-step00000100.ckpt"
    path.write_bytes(b"\x80\x04not really a pickle")
    check = completeness(path)
    assert check.whole
    assert check.reason == "pickle file: only its size is checked"
    path.write_bytes(b"")
    empty = completeness(path)
    assert not empty.whole and empty.reason == "file is empty"


# --- readiness ------------------------------------------------------------------------------------


def _set_mtime(path: Path, seconds: int) -> None:
    """Give each write a distinct mtime: fast test writes can share one."""
    os.utime(path, ns=(seconds * 10**9, seconds * 10**9))


def _checkpoint(path: Path, root: Path) -> Checkpoint:
    found = recognise(path, root=root)
    assert found is not None
    return found


def test_slow_in_place_write_becomes_ready_only_when_whole_and_settled(tmp_path: Path) -> None:
    path = tmp_path / "my_lora_000000500.safetensors"
    data = write_lora(path, rows=4096)
    chunk = len(data) // 4
    tracker = ReadinessTracker(settle_seconds=1.0, abandon_seconds=120.0)

    path.write_bytes(data[:chunk])
    _set_mtime(path, 1)
    assert tracker.observe(_checkpoint(path, tmp_path), now=0.0) == "waiting"
    for step in range(1, 4):  # the trainer appends a chunk every 2 s
        assert tracker.poll(now=step * 2.0 - 0.5) == []
        with path.open("ab") as handle:
            handle.write(data[chunk * step : chunk * (step + 1)] if step < 3 else data[chunk * step :])
        _set_mtime(path, 1 + step)
        assert tracker.poll(now=step * 2.0) == []
    assert completeness(path).whole
    assert tracker.poll(now=6.5) == []  # whole, but settling since 6.0
    events = tracker.poll(now=7.0)
    assert [(e.state, e.checkpoint.step) for e in events] == [("ready", 500)]
    assert events[0].size == len(data)
    assert tracker.poll(now=8.0) == []  # reported once
    assert len(tracker) == 0


def test_whole_but_still_changing_file_waits(tmp_path: Path) -> None:
    path = tmp_path / "my_lora_000000500.safetensors"
    write_lora(path)
    _set_mtime(path, 1)
    tracker = ReadinessTracker(settle_seconds=1.0)
    tracker.observe(_checkpoint(path, tmp_path), now=0.0)
    write_lora(path, rows=32)  # rewritten in place, whole again
    _set_mtime(path, 2)
    assert tracker.poll(now=0.5) == []
    assert tracker.poll(now=1.25) == []  # changed when seen at 0.5, settles at 1.5
    assert [e.state for e in tracker.poll(now=1.5)] == ["ready"]


def test_eridiffusion_waits_for_training_state_json(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint-250/flux_lora.safetensors"
    write_lora(path)
    tracker = ReadinessTracker(settle_seconds=1.0)
    assert tracker.observe(_checkpoint(path, tmp_path), now=0.0) == "waiting"
    assert tracker.poll(now=5.0) == []  # whole and settled, but no marker
    (path.parent / "training_state.json").write_text('{"step": 250}')
    events = tracker.poll(now=6.0)
    assert [(e.state, e.checkpoint.step) for e in events] == [("ready", 250)]


def test_marker_that_never_appears_is_abandoned(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint-250/sdxl_lora.safetensors"
    write_lora(path)
    tracker = ReadinessTracker(settle_seconds=1.0, abandon_seconds=120.0)
    tracker.observe(_checkpoint(path, tmp_path), now=0.0)
    assert tracker.poll(now=119.0) == []
    events = tracker.poll(now=120.0)
    assert [e.state for e in events] == ["abandoned"]
    assert "training_state.json never appeared" in events[0].reason


def test_truncated_for_good_after_long_stillness(tmp_path: Path) -> None:
    path = tmp_path / "my_lora_000000500.safetensors"
    data = write_lora(path)
    path.write_bytes(data[: len(data) - 10])
    tracker = ReadinessTracker(settle_seconds=1.0, abandon_seconds=120.0)
    tracker.observe(_checkpoint(path, tmp_path), now=0.0)
    assert tracker.poll(now=60.0) == []
    events = tracker.poll(now=120.0)
    assert [e.state for e in events] == ["abandoned"]
    assert events[0].reason.startswith("truncated for good: header says")
    assert tracker.poll(now=500.0) == []


def test_vanished_is_reported_once(tmp_path: Path) -> None:
    path = tmp_path / "my_lora_000000500.safetensors"
    write_lora(path)
    tracker = ReadinessTracker(settle_seconds=1.0)
    tracker.observe(_checkpoint(path, tmp_path), now=0.0)
    path.unlink()  # the trainer pruned it (max_step_saves_to_keep)
    events = tracker.poll(now=0.5)
    assert [e.state for e in events] == ["vanished"]
    assert "vanished" in events[0].reason
    assert tracker.poll(now=1.0) == []
    assert tracker.poll(now=200.0) == []


def test_observing_again_after_a_verdict_starts_over(tmp_path: Path) -> None:
    path = tmp_path / "my_lora.safetensors"
    write_lora(path)
    tracker = ReadinessTracker(settle_seconds=1.0)
    checkpoint = _checkpoint(path, tmp_path)
    tracker.observe(checkpoint, now=0.0)
    assert [e.state for e in tracker.poll(now=1.0)] == ["ready"]
    tracker.observe(checkpoint, now=10.0)  # the final file was written again
    assert tracker.poll(now=10.5) == []
    assert [e.state for e in tracker.poll(now=11.0)] == ["ready"]


def test_pickle_checkpoint_becomes_ready_so_it_can_be_refused(tmp_path: Path) -> None:
    path = tmp_path / "my_lora-step00000100.ckpt"
    path.write_bytes(b"\x80\x04pickle")
    tracker = ReadinessTracker(settle_seconds=1.0)
    tracker.observe(_checkpoint(path, tmp_path), now=0.0)
    events = tracker.poll(now=1.0)
    assert [(e.state, e.checkpoint.is_pickle) for e in events] == [("ready", True)]


def test_tracker_options_are_checked() -> None:
    with pytest.raises(ValueError, match="abandon_seconds"):
        ReadinessTracker(settle_seconds=5.0, abandon_seconds=1.0)
    with pytest.raises(ValueError, match="abandon_seconds"):
        ReadinessTracker(settle_seconds=-1.0, abandon_seconds=1.0)


def test_tracker_defaults_are_the_settings_defaults() -> None:
    tracker = ReadinessTracker()
    assert (tracker.settle_seconds, tracker.abandon_seconds) == (SETTLE_SECONDS, ABANDON_SECONDS)


def test_forget_stops_tracking_without_a_verdict(tmp_path: Path) -> None:
    path = tmp_path / "my_lora_000000500.safetensors"
    write_lora(path)
    tracker = ReadinessTracker(settle_seconds=1.0)
    tracker.observe(_checkpoint(path, tmp_path), now=0.0)
    assert tracker.paths == [path]
    tracker.forget(path)
    tracker.forget(path)  # twice is fine
    assert tracker.paths == [] and tracker.poll(now=10.0) == []


# --- close events: ready at once; the settle wait is the fallback ---------------------------------


def test_a_whole_file_its_writer_closed_is_ready_at_once(tmp_path: Path) -> None:
    path = tmp_path / "my_lora_000000500.safetensors"
    write_lora(path)
    tracker = ReadinessTracker(settle_seconds=1.0)
    assert tracker.observe(_checkpoint(path, tmp_path), now=0.0, closed=True) == "ready"
    events = tracker.poll(now=0.0)  # no settle wait
    assert [(e.state, e.checkpoint.step) for e in events] == [("ready", 500)]
    assert "closed by its writer" in events[0].reason


def test_a_file_closed_before_it_is_whole_waits_for_the_settle_fallback(tmp_path: Path) -> None:
    path = tmp_path / "my_lora_000000500.safetensors"
    data = write_lora(path)
    path.write_bytes(data[: len(data) // 2])  # the writer closed it half written
    _set_mtime(path, 1)
    tracker = ReadinessTracker(settle_seconds=1.0)
    assert tracker.observe(_checkpoint(path, tmp_path), now=0.0, closed=True) == "waiting"
    path.write_bytes(data)  # finished by another open and write, whose close event is lost
    _set_mtime(path, 2)
    assert tracker.poll(now=0.5) == []  # changed since the close: settle from 0.5
    assert tracker.poll(now=1.0) == []
    assert [e.state for e in tracker.poll(now=1.5)] == ["ready"]


def test_a_file_changed_after_its_close_event_is_not_ready_at_once(tmp_path: Path) -> None:
    path = tmp_path / "my_lora_000000500.safetensors"
    write_lora(path)
    _set_mtime(path, 1)
    tracker = ReadinessTracker(settle_seconds=1.0)
    tracker.observe(_checkpoint(path, tmp_path), now=0.0, closed=True)
    write_lora(path, rows=32)  # reopened and rewritten after the close (no close seen yet)
    _set_mtime(path, 2)
    assert tracker.poll(now=0.1) == []
    assert [e.state for e in tracker.poll(now=1.1)] == ["ready"]


def test_a_closed_file_still_waits_for_its_marker(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint-250/flux_lora.safetensors"
    write_lora(path)
    tracker = ReadinessTracker(settle_seconds=1.0)
    assert tracker.observe(_checkpoint(path, tmp_path), now=0.0, closed=True) == "waiting"
    (path.parent / "training_state.json").write_text("{}")
    assert [e.state for e in tracker.poll(now=0.1)] == ["ready"]  # closed, unchanged, marked


# --- corrupt for sure: failed once settled, not after `abandon_seconds` ---------------------------


def test_random_bytes_with_a_huge_header_length_are_corrupt_once_settled(tmp_path: Path) -> None:
    path = tmp_path / "my_lora_000000500.safetensors"
    path.write_bytes(struct.pack("<Q", 2**62) + os.urandom(40_000))
    assert completeness(path).corrupt
    tracker = ReadinessTracker(settle_seconds=1.0, abandon_seconds=120.0)
    tracker.observe(_checkpoint(path, tmp_path), now=0.0)
    assert tracker.poll(now=0.5) == []  # could still be rewritten
    (event,) = tracker.poll(now=1.0)
    assert event.state == "abandoned"
    assert event.reason.startswith("corrupt: header length field says")


def test_a_whole_header_that_is_not_json_is_corrupt_and_fails_at_its_close(tmp_path: Path) -> None:
    path = tmp_path / "my_lora_000000500.safetensors"
    body = b"\xff\xfe not json"
    path.write_bytes(struct.pack("<Q", len(body)) + body + b"data")
    assert completeness(path).corrupt
    tracker = ReadinessTracker(settle_seconds=1.0)
    tracker.observe(_checkpoint(path, tmp_path), now=0.0, closed=True)
    assert [e.state for e in tracker.poll(now=0.0)] == ["abandoned"]


@pytest.mark.parametrize("cut", [4, 20, -100], ids=["in-length-field", "in-header", "in-data"])
def test_a_file_still_being_written_is_never_corrupt(tmp_path: Path, cut: int) -> None:
    path = tmp_path / "a.safetensors"
    data = write_lora(path)
    path.write_bytes(data[:cut])
    check = completeness(path)
    assert not check.whole and not check.corrupt


def test_waiting_lists_every_tracked_file_with_its_reason(tmp_path: Path) -> None:
    whole, half = tmp_path / "my_lora_000000100.safetensors", tmp_path / "my_lora_000000200.safetensors"
    write_lora(whole)
    data = write_lora(half)
    half.write_bytes(data[:100])
    tracker = ReadinessTracker(settle_seconds=1.0)
    tracker.observe(_checkpoint(whole, tmp_path), now=0.0)
    tracker.observe(_checkpoint(half, tmp_path), now=0.0)
    tracker.poll(now=0.5)
    waiting = dict(tracker.waiting())
    assert waiting[whole].startswith("whole, settling (0.5 of 1.0 s)")
    assert waiting[half].startswith("not whole yet: header says")
