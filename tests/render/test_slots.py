"""Slot probes and the gate, with real files and locks and a scripted probe (NVML: test_nvml.py)."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from sidecar.render.slots import (
    AllOpen,
    AlwaysOpen,
    FileProbe,
    SlotClosedError,
    SlotGate,
    build_probe,
)


class ScriptedProbe:
    """A probe whose answer the test sets; records when it was asked and whether it is held."""

    def __init__(self, is_open: bool = True, reason: str = "scripted") -> None:
        self.answer = is_open
        self.reason = reason
        self.asked: list[float] = []
        self.held = False

    def is_open(self, now: float) -> bool:
        self.asked.append(now)
        return self.answer

    def describe(self) -> str:
        return self.reason

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        self.held = True
        try:
            yield
        finally:
            self.held = False


# --- files and locks ------------------------------------------------------------


def test_file_exists_mode(tmp_path):
    marker = tmp_path / "render-now"
    probe = FileProbe(marker)
    assert not probe.is_open(0.0)
    assert probe.describe() == f"waiting for a slot: {marker} does not exist"
    marker.touch()
    assert probe.is_open(1.0)
    marker.unlink()
    assert not probe.is_open(2.0)


def test_file_absent_mode(tmp_path):
    marker = tmp_path / "trainer-busy"
    probe = FileProbe(marker, mode="absent")
    assert probe.is_open(0.0)
    marker.touch()
    assert not probe.is_open(1.0)
    assert "trainer-busy exists" in probe.describe()


def test_unknown_file_mode(tmp_path):
    with pytest.raises(ValueError, match="`mode` must be"):
        FileProbe(tmp_path / "x", mode="present")  # type: ignore[arg-type]


def test_lock_free_then_held_by_another_fd(tmp_path):
    lock = tmp_path / "gpu0.lock"
    probe = FileProbe(lock, mode="lock")
    assert probe.is_open(0.0)  # the lock file is created when missing
    assert lock.exists()
    with open(lock) as other:
        fcntl.flock(other, fcntl.LOCK_EX)
        assert not probe.is_open(1.0)
        assert probe.describe() == f"waiting for a slot: another process holds the lock {lock}"
        with pytest.raises(SlotClosedError), probe.hold():
            pass
    assert probe.is_open(2.0)  # closing the trainer's descriptor released it


def test_lock_held_by_another_process(tmp_path):
    lock = tmp_path / "gpu0.lock"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, sys; f = open(sys.argv[1], 'w'); fcntl.flock(f, fcntl.LOCK_EX); "
            "print('locked', flush=True); sys.stdin.read()",
            str(lock),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        probe = FileProbe(lock, mode="lock")
        assert not probe.is_open(0.0)
    finally:
        holder.communicate("", timeout=30)
    assert probe.is_open(1.0)


def test_hold_keeps_the_lock_during_a_render(tmp_path):
    lock = tmp_path / "gpu0.lock"
    probe = FileProbe(lock, mode="lock")
    assert probe.is_open(0.0)
    with probe.hold(), open(lock) as trainer:
        with pytest.raises(BlockingIOError):
            fcntl.flock(trainer, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the trainer would wait
        assert probe.is_open(1.0)  # our own hold does not close our slot
    with open(lock) as trainer:
        fcntl.flock(trainer, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released after the render


def test_lock_in_an_unwritable_place_is_a_closed_slot(tmp_path):
    probe = FileProbe(tmp_path / "missing-dir" / "gpu0.lock", mode="lock")
    assert not probe.is_open(0.0)
    assert "cannot open the lock" in probe.describe()


def test_hold_is_a_no_op_for_markers(tmp_path):
    """A marker cannot be held: holding neither creates, locks nor removes it."""
    marker = tmp_path / "x"
    probe = FileProbe(marker, mode="absent")
    assert probe.is_open(0.0)
    with probe.hold(), AlwaysOpen().hold():
        assert not marker.exists()
        marker.touch()  # the trainer's hook is not kept out
        assert not probe.is_open(1.0)
    assert marker.exists()


def test_a_held_lock_keeps_a_second_sidecar_out(tmp_path):
    """Two daemons sharing one lock file: while one renders, the other's slot is closed."""
    lock = tmp_path / "gpu0.lock"
    first, second = FileProbe(lock, mode="lock"), FileProbe(lock, mode="lock")
    assert first.is_open(0.0) and second.is_open(0.0)
    with first.hold():
        assert not second.is_open(1.0)
        assert second.describe() == f"waiting for a slot: another process holds the lock {lock}"
        with pytest.raises(SlotClosedError, match="taken between the check and the render"), second.hold():
            pytest.fail("the second holder entered its render")
    assert second.is_open(2.0)
    with second.hold():
        assert not first.is_open(3.0)


# --- combining ------------------------------------------------------------------


def test_all_open_needs_every_probe(tmp_path):
    marker = tmp_path / "go"
    scripted = ScriptedProbe(reason="slot open: scripted")
    probe = AllOpen([scripted, FileProbe(marker)])
    assert not probe.is_open(0.0)
    assert "go does not exist" in probe.describe()
    marker.touch()
    assert probe.is_open(1.0)
    assert probe.describe() == f"slot open: scripted; slot open: {marker} exists"
    scripted.answer, scripted.reason = False, "waiting for a slot: scripted"
    assert not probe.is_open(2.0)
    assert probe.describe() == "waiting for a slot: scripted"
    with pytest.raises(ValueError):
        AllOpen([])


def test_all_open_asks_every_probe_even_after_one_is_closed():
    """Each probe sees every check, so a probe's own clock (NVML's dwell) keeps running."""
    closed, later = ScriptedProbe(is_open=False), ScriptedProbe()
    probe = AllOpen([closed, later])
    assert not probe.is_open(0.0)
    assert not probe.is_open(1.0)
    assert later.asked == [0.0, 1.0]


def test_all_open_holds_every_lock_or_none(tmp_path):
    first, second = tmp_path / "a.lock", tmp_path / "b.lock"
    probe = AllOpen([FileProbe(first, mode="lock"), FileProbe(second, mode="lock")])
    assert probe.is_open(0.0)
    with probe.hold():
        for path in (first, second):
            assert not FileProbe(path, mode="lock").is_open(1.0), path
    with open(second) as trainer:
        fcntl.flock(trainer, fcntl.LOCK_EX)
        with pytest.raises(SlotClosedError), probe.hold():
            pytest.fail("entered a render without the second lock")
        assert FileProbe(first, mode="lock").is_open(2.0)  # the first lock was let go again


# --- the gate -------------------------------------------------------------------


def test_gate_logs_each_transition_once(caplog):
    probe = ScriptedProbe(is_open=False, reason="waiting for a slot: trainer busy")
    gate = SlotGate(probe)
    assert gate.status(0.0) == "slot not checked yet"
    with caplog.at_level(logging.INFO, logger="sidecar.slots"):
        first = gate.wait_state(0.0)
        probe.reason = "waiting for a slot: trainer still busy"
        again = gate.wait_state(1.0)
    assert not first.is_open and first.changed and first.reason == "waiting for a slot: trainer busy"
    assert not again.is_open and not again.changed  # a new reason alone is no transition
    assert [r.getMessage() for r in caplog.records] == ["waiting for a slot: trainer busy"]
    assert gate.status(30.0) == "waiting for a slot: trainer still busy (for 30 s)"

    caplog.clear()
    probe.answer, probe.reason = True, "slot open: trainer idle"
    with caplog.at_level(logging.INFO, logger="sidecar.slots"):
        opened = gate.wait_state(42.0)
        assert not gate.wait_state(43.0).changed
    assert opened.is_open and opened.changed
    assert [r.getMessage() for r in caplog.records] == ["slot opened after 42 s: slot open: trainer idle"]

    caplog.clear()
    probe.answer, probe.reason = False, "waiting for a slot: trainer back"
    with caplog.at_level(logging.INFO, logger="sidecar.slots"):
        closed = gate.wait_state(50.0, in_checkpoint=True)
    assert not closed.is_open and closed.changed
    assert [r.getMessage() for r in caplog.records] == [
        "slot closed mid-checkpoint: finishing the current image, then releasing the GPU "
        "(waiting for a slot: trainer back)"
    ]

    probe.answer = True
    assert gate.wait_state(60.0).is_open
    caplog.clear()
    probe.answer = False
    with caplog.at_level(logging.INFO, logger="sidecar.slots"):
        gate.wait_state(70.0)
    assert [r.getMessage() for r in caplog.records] == ["slot closed: waiting for a slot: trainer back"]


def test_first_open_state_is_logged_without_a_wait(caplog):
    gate = SlotGate(AlwaysOpen("cuda:1"))
    with caplog.at_level(logging.INFO, logger="sidecar.slots"):
        state = gate.wait_state(5.0)
        assert not gate.wait_state(6.0).changed
    assert state.is_open and state.changed
    assert [r.getMessage() for r in caplog.records] == ["slot opened: always open: rendering on cuda:1"]
    assert gate.status(7.0) == "always open: rendering on cuda:1 (for 2 s)"


def test_only_a_gate_without_share_gpu_or_slot_file_is_always_open(tmp_path):
    """`always_open` lets the daemon keep the pipeline on the card between renders."""
    assert SlotGate(build_probe(share_gpu=None)).always_open
    assert SlotGate(AlwaysOpen()).always_open
    for mode in ("exists", "absent", "lock"):
        assert not SlotGate(
            build_probe(share_gpu=None, slot_file=tmp_path / "x", slot_file_mode=mode)
        ).always_open
    assert not SlotGate(ScriptedProbe()).always_open


def test_gate_hold_holds_the_probe():
    probe = ScriptedProbe()
    gate = SlotGate(probe)
    with gate.hold():
        assert probe.held
    assert not probe.held


def test_gate_hold_uses_the_probe_lock(tmp_path: Path):
    gate = SlotGate(FileProbe(tmp_path / "gpu.lock", mode="lock"))
    assert gate.wait_state(0.0).is_open
    with gate.hold(), open(tmp_path / "gpu.lock") as other, pytest.raises(BlockingIOError):
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)


# --- build_probe ----------------------------------------------------------------


def test_build_probe_without_nvml(tmp_path):
    assert isinstance(build_probe(share_gpu=None), AlwaysOpen)
    probe = build_probe(share_gpu=None, slot_file=tmp_path / "go", slot_file_mode="absent")
    assert isinstance(probe, FileProbe)
    assert (probe.path, probe.mode) == (tmp_path / "go", "absent")
