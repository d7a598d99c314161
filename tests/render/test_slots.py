"""Slot probes and the gate, with a fake NVML and real files and locks."""

from __future__ import annotations

import fcntl
import logging
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from sidecar.errors import SidecarError
from sidecar.render import slots
from sidecar.render.nvml import NvmlProbe, nvml_index_for_cuda
from sidecar.render.slots import (
    AllOpen,
    AlwaysOpen,
    FileProbe,
    SlotClosedError,
    SlotGate,
    SlotProbe,
    build_probe,
)

GIB = 1024**3
OWN_PID = 4242
TRAINER_PID = 1234


class FakeNvmlError(Exception):
    pass


class FakeNvml:
    """Just the pynvml calls sidecar makes, over a dict of cards."""

    NVMLError = FakeNvmlError

    def __init__(self, cards: int = 1, *, free_bytes: int = 80 * GIB) -> None:
        self.processes: dict[int, list[SimpleNamespace]] = {i: [] for i in range(cards)}
        self.free = {i: free_bytes for i in range(cards)}
        self.uuids = [f"GPU-0000000{i}-aaaa-bbbb-cccc-dddddddddddd" for i in range(cards)]
        self.inits = 0
        self.fail = False

    def nvmlInit(self) -> None:
        self.inits += 1

    def nvmlShutdown(self) -> None:
        self.inits -= 1

    def nvmlDeviceGetCount(self) -> int:
        return len(self.processes)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        return index

    def nvmlDeviceGetUUID(self, handle: int) -> bytes:
        return self.uuids[handle].encode()  # old pynvml returns bytes

    def nvmlDeviceGetComputeRunningProcesses(self, handle: int) -> list[SimpleNamespace]:
        if self.fail:
            raise FakeNvmlError("GPU is lost")
        return list(self.processes[handle])

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> SimpleNamespace:
        return SimpleNamespace(free=self.free[handle], total=80 * GIB, used=80 * GIB - self.free[handle])

    def run(self, pid: int, used: int, card: int = 0) -> None:
        self.processes[card].append(SimpleNamespace(pid=pid, usedGpuMemory=used))
        self.free[card] -= used

    def stop(self, pid: int, card: int = 0) -> None:
        for info in [p for p in self.processes[card] if p.pid == pid]:
            self.processes[card].remove(info)
            self.free[card] += info.usedGpuMemory


@pytest.fixture
def nvml() -> FakeNvml:
    return FakeNvml()


def _probe(nvml: FakeNvml, **kwargs) -> NvmlProbe:
    options = {"required_free_bytes": None, "dwell_seconds": 5.0, "own_pids": [OWN_PID], "nvml": nvml}
    options.update(kwargs)
    return NvmlProbe(0, label="cuda:0", **options)


# --- NVML -----------------------------------------------------------------------


def test_probes_satisfy_the_protocol(nvml, tmp_path):
    for probe in (_probe(nvml), FileProbe(tmp_path / "x"), AlwaysOpen()):
        assert isinstance(probe, SlotProbe)


def test_foreign_process_closes_and_dwell_reopens(nvml):
    probe = _probe(nvml)
    nvml.run(TRAINER_PID, 30 * GIB)
    assert not probe.is_open(0.0)
    assert probe.describe().startswith(f"waiting for a slot: process {TRAINER_PID}")
    assert "is using cuda:0 (30.0 GiB)" in probe.describe()

    nvml.stop(TRAINER_PID)
    assert not probe.is_open(10.0)  # clear, but not for long enough yet
    assert "slot opening" in probe.describe()
    assert not probe.is_open(14.9)
    assert probe.is_open(15.0)
    assert probe.describe() == "slot open: no other compute process on cuda:0"


def test_a_blip_restarts_the_dwell_clock(nvml):
    probe = _probe(nvml)
    assert not probe.is_open(0.0)
    nvml.run(TRAINER_PID, GIB)
    assert not probe.is_open(3.0)
    nvml.stop(TRAINER_PID)
    assert not probe.is_open(4.0)
    assert not probe.is_open(8.0)
    assert probe.is_open(9.0)
    nvml.run(TRAINER_PID, GIB)
    assert not probe.is_open(9.5)  # closing is immediate


def test_own_process_is_not_foreign(nvml):
    probe = _probe(nvml, dwell_seconds=0.0)
    nvml.run(OWN_PID, 2 * GIB)  # our CUDA context and a parked pipeline's leftovers
    assert probe.is_open(0.0)


def test_default_own_pid_is_this_process(nvml):
    probe = NvmlProbe(0, required_free_bytes=None, dwell_seconds=0.0, nvml=nvml)
    nvml.run(os.getpid(), GIB)
    assert probe.is_open(0.0)


def test_enough_free_memory_opens_beside_a_foreign_process(nvml):
    probe = _probe(nvml, required_free_bytes=20 * GIB, dwell_seconds=2.0)
    nvml.run(TRAINER_PID, 70 * GIB)
    assert not probe.is_open(0.0)
    assert "10.0 GiB free < 20.0 GiB needed" in probe.describe()
    nvml.stop(TRAINER_PID)
    nvml.run(TRAINER_PID, 40 * GIB)  # the trainer shrank: 40 GiB free now
    assert not probe.is_open(1.0)
    assert probe.is_open(3.0)
    assert "40.0 GiB free beside process 1234" in probe.describe()


def test_nvml_failure_closes_the_slot(nvml):
    probe = _probe(nvml, dwell_seconds=0.0)
    nvml.fail = True
    assert not probe.is_open(0.0)
    assert "NVML query of cuda:0 failed (GPU is lost)" in probe.describe()
    nvml.fail = False
    assert probe.is_open(1.0)


def test_bad_gpu_index(nvml):
    probe = NvmlProbe(3, required_free_bytes=None, nvml=nvml)
    with pytest.raises(SidecarError, match="NVML sees 1 GPU"):
        probe.is_open(0.0)


def test_nvml_that_cannot_start():
    broken = FakeNvml()
    broken.nvmlInit = lambda: (_ for _ in ()).throw(FakeNvmlError("Driver Not Loaded"))
    with pytest.raises(SidecarError, match="NVML cannot start"):
        NvmlProbe(0, required_free_bytes=None, nvml=broken).is_open(0.0)


def test_missing_pynvml_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes `import pynvml` fail
    with pytest.raises(SidecarError, match=r"sidecar\[nvml\]"):
        NvmlProbe(0, required_free_bytes=None)


def test_close_shuts_nvml_down(nvml):
    probe = _probe(nvml)
    probe.is_open(0.0)
    assert nvml.inits == 1
    probe.close()
    probe.close()
    assert nvml.inits == 0


def test_nvml_index_follows_cuda_visible_devices(monkeypatch):
    nvml = FakeNvml(cards=3)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,0")
    assert nvml_index_for_cuda(0, nvml=nvml) == 2
    assert nvml_index_for_cuda(1, nvml=nvml) == 0
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-00000001")
    assert nvml_index_for_cuda(0, nvml=nvml) == 1
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert nvml_index_for_cuda(1, nvml=nvml) == 1
    assert nvml_index_for_cuda(0, nvml=nvml, cuda_uuid="00000002-aaaa-bbbb-cccc-dddddddddddd") == 2


def test_build_probe(monkeypatch, tmp_path):
    nvml = FakeNvml(cards=2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert isinstance(build_probe(share_gpu=None), AlwaysOpen)
    probe = build_probe(share_gpu=0, nvml=nvml, dwell_seconds=0.0)
    assert isinstance(probe, NvmlProbe)
    assert probe.gpu_index == 1
    assert probe.label == "cuda:0"
    assert nvml.inits == 0
    both = build_probe(share_gpu=0, slot_file=tmp_path / "go", nvml=nvml)
    assert isinstance(both, AllOpen)
    assert isinstance(build_probe(share_gpu=None, slot_file=tmp_path / "go"), FileProbe)


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
    with FileProbe(tmp_path / "x").hold(), AlwaysOpen().hold():
        pass


# --- combining and gating -------------------------------------------------------


def test_all_open_needs_every_probe(nvml, tmp_path):
    marker = tmp_path / "go"
    probe = AllOpen([_probe(nvml, dwell_seconds=0.0), FileProbe(marker)])
    assert not probe.is_open(0.0)
    assert "go does not exist" in probe.describe()
    marker.touch()
    assert probe.is_open(1.0)
    nvml.run(TRAINER_PID, GIB)
    assert not probe.is_open(2.0)
    assert f"process {TRAINER_PID}" in probe.describe()
    with pytest.raises(ValueError):
        AllOpen([])


def test_gate_logs_transitions_once(nvml, caplog):
    gate = SlotGate(_probe(nvml, dwell_seconds=2.0))
    nvml.run(TRAINER_PID, 30 * GIB)
    with caplog.at_level(logging.INFO, logger="sidecar.slots"):
        first = gate.wait_state(0.0)
        again = gate.wait_state(1.0)
    assert not first.is_open and first.changed
    assert not again.changed
    assert [r.getMessage() for r in caplog.records] == [first.reason]
    assert "waiting for a slot" in gate.status(30.0) and "(for 30 s)" in gate.status(30.0)

    caplog.clear()
    nvml.stop(TRAINER_PID)
    with caplog.at_level(logging.INFO, logger="sidecar.slots"):
        assert not gate.wait_state(40.0).is_open  # dwelling: still closed, reason changes
        opened = gate.wait_state(42.0)
    assert opened.is_open and opened.changed
    assert [r.getMessage() for r in caplog.records] == [
        "slot opened after 42 s: slot open: no other compute process on cuda:0"
    ]

    caplog.clear()
    nvml.run(TRAINER_PID, 30 * GIB)
    with caplog.at_level(logging.INFO, logger="sidecar.slots"):
        closed = gate.wait_state(50.0, in_checkpoint=True)
    assert not closed.is_open and closed.changed
    assert (
        caplog.records[0]
        .getMessage()
        .startswith("slot closed mid-checkpoint: finishing the current image, then releasing the GPU")
    )

    caplog.clear()
    nvml.stop(TRAINER_PID)
    gate.wait_state(60.0)
    assert gate.wait_state(62.0).is_open
    nvml.run(TRAINER_PID, 30 * GIB)
    with caplog.at_level(logging.INFO, logger="sidecar.slots"):
        gate.wait_state(70.0)
    assert caplog.records[0].getMessage().startswith("slot closed: waiting for a slot: process 1234")


def test_gate_always_open():
    gate = SlotGate(AlwaysOpen("cuda:1"))
    assert gate.status(0.0) == "slot not checked yet"
    state = gate.wait_state(0.0)
    assert state.is_open and state.changed
    assert not gate.wait_state(1.0).changed
    with gate.hold():
        pass


def test_gate_hold_uses_the_probe_lock(tmp_path: Path):
    gate = SlotGate(FileProbe(tmp_path / "gpu.lock", mode="lock"))
    assert gate.wait_state(0.0).is_open
    with gate.hold(), open(tmp_path / "gpu.lock") as other, pytest.raises(BlockingIOError):
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_process_name_of_this_process():
    assert slots.process_name(os.getpid())
    assert slots.process_name(2**22 + 12345) is None
