"""Recognising trainers' checkpoint files, checking them whole, and deciding when they are ready."""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from sidecar.errors import CheckpointError, ConfigError
from sidecar.intake.cache import content_hash
from sidecar.intake.layouts import Checkpoint, recognise
from sidecar.intake.readiness import ReadinessTracker, completeness
from sidecar.intake.steps import progress_from_metadata, resolve_step, step_from_metadata
from sidecar.weights import MAX_HEADER_BYTES, read_header

ROOT = Path("/runs/out")


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


# --- recognise --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("relative", "layout", "name", "step", "epoch", "is_final"),
    [
        ("my_lora_000000500.safetensors", "ai-toolkit", "my_lora", 500, None, False),
        ("my_lora/my_lora_000012000.safetensors", "ai-toolkit", "my_lora", 12000, None, False),
        ("my_lora.safetensors", "final", "my_lora", None, None, True),
        ("my_lora-step00001200.safetensors", "kohya", "my_lora", 1200, None, False),
        ("my_lora-000003.safetensors", "kohya", "my_lora", None, 3, False),
        (
            "save/mylora2024-05-01_12-30-45-save-1200-3-100.safetensors",
            "onetrainer",
            "mylora",
            1200,
            3,
            False,
        ),
        ("save/2024-05-01_12-30-45-save-40-0-40.safetensors", "onetrainer", "onetrainer", 40, 0, False),
        ("checkpoint-400/pytorch_lora_weights.safetensors", "diffusers", "checkpoint-400", 400, None, False),
        ("pytorch_lora_weights.safetensors", "diffusers", "pytorch_lora_weights", None, None, True),
        ("checkpoint-250/flux_lora.safetensors", "eridiffusion", "checkpoint-250", 250, None, False),
        ("sd35_lora_step750.safetensors", "eridiffusion", "sd35", 750, None, False),
        ("sdxl_lora_final.safetensors", "eridiffusion", "sdxl", None, None, True),
    ],
)
def test_recognises_each_trainers_layout(
    relative: str, layout: str, name: str, step: int | None, epoch: int | None, is_final: bool
) -> None:
    found = recognise(ROOT / relative, root=ROOT)
    assert found is not None
    assert (found.layout, found.name, found.step, found.epoch, found.is_final) == (
        layout,
        name,
        step,
        epoch,
        is_final,
    )
    assert not found.is_pickle


def test_eridiffusion_checkpoint_folder_needs_its_marker_and_names_its_arch() -> None:
    found = recognise(ROOT / "checkpoint-250/flux_lora.safetensors", root=ROOT)
    assert found is not None
    assert found.marker == ROOT / "checkpoint-250/training_state.json"
    assert found.arch == "flux"
    assert recognise(ROOT / "sd35_lora_step750.safetensors", root=ROOT).arch == "sd3"  # type: ignore[union-attr]
    # Other layouts write no marker.
    assert recognise(ROOT / "checkpoint-400/pytorch_lora_weights.safetensors", root=ROOT).marker is None  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "relative",
    [
        "optimizer.safetensors",
        "optimizer.pt",
        "checkpoint-250/optimizer.safetensors",
        "checkpoint-250/training_state.json",
        "checkpoint-400/optimizer.bin",
        "checkpoint-400/model.safetensors",
        "checkpoint-400/random_states_0.pkl",
        "checkpoint-400/ema/pytorch_lora_weights.safetensors",
        "my_lora_ema.safetensors",
        "my_lora-ema_000000500.safetensors",
        "ema/my_lora_000000500.safetensors",
        "samples/1712345678__000000500_0.png",
        "samples/my_lora_000000500.safetensors",
        "my_lora_000000500.safetensors.tmp",
        "my_lora_000000500.safetensors.part",
        "my_lora_000000500.tmp.safetensors",
        ".my_lora_000000500.safetensors",
        "my_lora-step00000100-state/model.safetensors",
        "my_lora-state/model.safetensors",
        "backup/2024-05-01_12-30-45-backup-1200-3-100/lora.safetensors",
        ".sidecar/jobs.sqlite3",
        "config.yaml",
        "pytorch_model.bin",
        "my_lora.png",
    ],
)
def test_rejects_files_that_are_not_loras(relative: str) -> None:
    assert recognise(ROOT / relative, root=ROOT) is None


@pytest.mark.parametrize(
    ("relative", "layout", "step"),
    [
        ("my_lora-step00000100.ckpt", "kohya", 100),
        ("my_lora_000000500.pt", "ai-toolkit", 500),
        ("checkpoint-400/pytorch_lora_weights.bin", "diffusers", 400),
        ("my_lora.ckpt", "final", None),
    ],
)
def test_pickle_checkpoints_are_recognised_but_flagged(relative: str, layout: str, step: int | None) -> None:
    found = recognise(ROOT / relative, root=ROOT)
    assert found is not None
    assert found.is_pickle
    assert (found.layout, found.step) == (layout, step)
    assert "pickle" in found.pickle_message
    assert "safetensors" in found.pickle_message


def test_user_pattern_takes_precedence_and_reads_epoch() -> None:
    pattern = re.compile(r"run/ep(?P<epoch>\d+)_it(?P<step>\d+)\.safetensors$")
    found = recognise(ROOT / "run/ep2_it300.safetensors", root=ROOT, pattern=pattern)
    assert found is not None
    assert (found.layout, found.step, found.epoch) == ("pattern", 300, 2)

    # Precedence: the user's step wins over the built-in reading of the name.
    found = recognise(ROOT / "x_000000500.safetensors", root=ROOT, pattern=re.compile(r"x_0*(?P<step>\d)00"))
    assert found is not None
    assert (found.layout, found.step) == ("pattern", 5)

    # No match: the built-in layouts still apply.
    found = recognise(ROOT / "my_lora_000000500.safetensors", root=ROOT, pattern=pattern)
    assert found is not None
    assert (found.layout, found.step) == ("ai-toolkit", 500)


def test_user_pattern_without_step_group_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="`pattern` must have a named group `step`"):
        recognise(ROOT / "a_1.safetensors", root=ROOT, pattern=re.compile(r"a_(\d+)"))


def test_path_outside_root_is_matched_on_its_name() -> None:
    found = recognise(Path("/elsewhere/my_lora_000000500.safetensors"), root=ROOT)
    assert found is not None
    assert found.step == 500


# --- header and completeness -------------------------------------------------------------------


def test_whole_file_header_is_read(tmp_path: Path) -> None:
    path = tmp_path / "a.safetensors"
    write_lora(path, metadata={"ss_steps": "100"})
    header = read_header(path)
    assert set(header.tensors) == {
        "lora_unet_down.lora_down.weight",
        "lora_unet_down.lora_up.weight",
        "lora_unet_down.alpha",
    }
    assert header.tensors["lora_unet_down.lora_down.weight"].shape == (64, 16)
    assert header.tensors["lora_unet_down.lora_down.weight"].dtype == "F32"
    assert header.metadata == {"ss_steps": "100"}
    assert header.expected_file_bytes == path.stat().st_size
    check = completeness(path)
    assert check.whole
    assert check.size == path.stat().st_size
    assert check.mtime_ns == path.stat().st_mtime_ns


def test_truncated_file_is_not_whole_and_says_by_how_much(tmp_path: Path) -> None:
    path = tmp_path / "a.safetensors"
    data = write_lora(path)
    path.write_bytes(data[: len(data) // 2])
    check = completeness(path)
    assert not check.whole
    assert re.search(r"header says \d+ bytes of data, file has \d+", check.reason)
    with pytest.raises(CheckpointError, match="not a whole safetensors file"):
        read_header(path)


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
    with pytest.raises(CheckpointError, match="empty"):
        read_header(path)


def test_garbage_header(tmp_path: Path) -> None:
    path = tmp_path / "a.safetensors"
    body = b"this is not json at all"
    path.write_bytes(struct.pack("<Q", len(body)) + body)
    check = completeness(path)
    assert not check.whole
    assert "not JSON" in check.reason
    with pytest.raises(CheckpointError, match="not JSON"):
        read_header(path)


def test_huge_header_length_is_refused_without_allocating(tmp_path: Path) -> None:
    path = tmp_path / "a.safetensors"
    path.write_bytes(struct.pack("<Q", 2**40) + b"{}")
    started = time.perf_counter()
    check = completeness(path)
    assert time.perf_counter() - started < 1.0
    assert not check.whole
    assert str(MAX_HEADER_BYTES) in check.reason
    with pytest.raises(CheckpointError, match="more than"):
        read_header(path)


def test_offsets_out_of_range(tmp_path: Path) -> None:
    path = tmp_path / "a.safetensors"
    header = json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 8)
    with pytest.raises(CheckpointError, match="out of range"):
        read_header(path)
    assert not completeness(path).whole


def test_trailing_bytes_are_not_whole(tmp_path: Path) -> None:
    path = tmp_path / "a.safetensors"
    data = write_lora(path)
    path.write_bytes(data + b"\0" * 16)
    assert not completeness(path).whole
    with pytest.raises(CheckpointError, match="declare"):
        read_header(path)


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
    with pytest.raises(CheckpointError, match="does not exist"):
        read_header(tmp_path / "gone.safetensors")


def test_pickle_file_is_whole_by_size_only(tmp_path: Path) -> None:
    path = tmp_path / "a-step00000100.ckpt"
    path.write_bytes(b"\x80\x04not really a pickle")
    assert completeness(path).whole
    assert step_from_metadata(path) is None  # never opened as anything


# --- metadata and hash --------------------------------------------------------------------------


def test_step_from_kohya_metadata(tmp_path: Path) -> None:
    path = tmp_path / "my_lora-000003.safetensors"
    write_lora(path, metadata={"ss_steps": "1200", "ss_epoch": "3", "ss_network_dim": "16"})
    assert step_from_metadata(path) == 1200
    found = recognise(path, root=tmp_path)
    assert found is not None
    assert found.step is None
    resolved = resolve_step(found)
    assert (resolved.step, resolved.epoch) == (1200, 3)


def test_step_from_ai_toolkit_training_info(tmp_path: Path) -> None:
    path = tmp_path / "my_lora.safetensors"
    info = {"step": 2000, "epoch": 4}
    write_lora(
        path, metadata={"training_info": json.dumps(info), "software": json.dumps({"name": "ai-toolkit"})}
    )
    assert step_from_metadata(path) == 2000
    resolved = resolve_step(recognise(path, root=tmp_path))  # type: ignore[arg-type]
    assert (resolved.step, resolved.epoch, resolved.is_final) == (2000, 4, True)


def test_step_from_metadata_absent(tmp_path: Path) -> None:
    path = tmp_path / "my_lora.safetensors"
    write_lora(path)
    assert step_from_metadata(path) is None
    assert progress_from_metadata({"training_info": "not json", "ss_steps": "x"}) == (None, None)


def test_content_hash_streams_the_whole_file(tmp_path: Path) -> None:
    path = tmp_path / "a.safetensors"
    data = write_lora(path)
    assert content_hash(path, chunk_bytes=7) == hashlib.sha256(data).hexdigest()


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
