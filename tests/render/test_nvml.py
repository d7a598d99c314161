"""The NVML probe of `--share-gpu N`, over a fake pynvml: foreign processes, free memory, dwell, errors."""

from __future__ import annotations

import logging
import os
import sys
from types import SimpleNamespace

import pytest

from sidecar.errors import SidecarError
from sidecar.render.nvml import NvmlProbe, nvml_index_for_cuda, process_name
from sidecar.render.slots import AllOpen, SlotGate, build_probe

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


# --- the probe ------------------------------------------------------------------


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


def test_process_name_of_this_process():
    assert process_name(os.getpid())
    assert process_name(2**22 + 12345) is None


# --- as `--share-gpu N` builds and uses it ----------------------------------------


def test_build_probe_watches_the_nvml_index_of_the_cuda_card(monkeypatch):
    nvml = FakeNvml(cards=2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    probe = build_probe(share_gpu=0, nvml=nvml, dwell_seconds=0.0)
    assert isinstance(probe, NvmlProbe)
    assert probe.gpu_index == 1
    assert probe.label == "cuda:0"
    assert nvml.inits == 0  # the index lookup shut NVML down again


def test_build_probe_with_share_gpu_and_a_slot_file_needs_both(monkeypatch, tmp_path):
    nvml = FakeNvml(cards=1)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    marker = tmp_path / "go"
    probe = build_probe(share_gpu=0, slot_file=marker, nvml=nvml, dwell_seconds=0.0)
    assert isinstance(probe, AllOpen)
    assert not probe.is_open(0.0)
    assert "go does not exist" in probe.describe()
    marker.touch()
    assert probe.is_open(1.0)
    nvml.run(TRAINER_PID, GIB)
    assert not probe.is_open(2.0)
    assert f"process {TRAINER_PID}" in probe.describe()


def test_gate_over_nvml_logs_each_transition_once(nvml, caplog):
    gate = SlotGate(_probe(nvml, dwell_seconds=2.0))
    assert not gate.always_open
    nvml.run(TRAINER_PID, 30 * GIB)
    with caplog.at_level(logging.INFO, logger="sidecar.slots"):
        first = gate.wait_state(0.0)
        again = gate.wait_state(1.0)
    assert not first.is_open and first.changed
    assert not again.changed
    assert [r.getMessage() for r in caplog.records] == [first.reason]

    caplog.clear()
    nvml.stop(TRAINER_PID)
    with caplog.at_level(logging.INFO, logger="sidecar.slots"):
        assert not gate.wait_state(40.0).is_open  # dwelling: still closed, reason changes
        opened = gate.wait_state(42.0)
    assert opened.is_open and opened.changed
    assert [r.getMessage() for r in caplog.records] == [
        "slot opened after 42 s: slot open: no other compute process on cuda:0"
    ]


# --- in a container: NVML reports host PIDs ------------------------------------------

HOST_PID_OF_SIDECAR = 987654  # what NVML calls sidecar from outside its PID namespace
HOST_PID_OF_TRAINER = 123456


def _container_probe(nvml: FakeNvml, reserved: dict[str, int | None]) -> NvmlProbe:
    """A probe inside a container: no host PID is visible, torch holds `reserved["bytes"]`."""
    return NvmlProbe(
        0,
        required_free_bytes=None,
        dwell_seconds=0.0,
        nvml=nvml,
        own_pids=[OWN_PID],
        own_usage=lambda: reserved["bytes"],
        visible=lambda pid: pid == OWN_PID,
    )


def test_in_a_container_sidecars_own_context_is_recognised_and_the_slot_reopens(nvml, caplog):
    """The bug: after the first render sidecar's own host PID closed the slot for good."""
    reserved: dict[str, int | None] = {"bytes": None}
    probe = _container_probe(nvml, reserved)
    assert probe.is_open(0.0)  # nobody on the card: sidecar loads and renders
    reserved["bytes"] = 10 * GIB  # now it holds a pipeline ...
    nvml.run(HOST_PID_OF_SIDECAR, 10 * GIB + 400 * 1024**2)  # ... which NVML shows under a host PID
    with caplog.at_level(logging.INFO, logger="sidecar.slots"):
        assert probe.is_open(1.0)
    assert f"process {HOST_PID_OF_SIDECAR} is sidecar itself" in caplog.text
    nvml.run(HOST_PID_OF_TRAINER, 20 * GIB)  # the trainer starts: the slot closes
    assert not probe.is_open(2.0)
    assert str(HOST_PID_OF_TRAINER) in probe.describe()
    reserved["bytes"] = 0  # parked: only the CUDA context is left
    nvml.free[0] += 10 * GIB
    nvml.stop(HOST_PID_OF_TRAINER)
    assert probe.is_open(3.0)  # reopens: sidecar's own context is not foreign


def test_without_a_cuda_context_nothing_is_learnt(nvml):
    probe = _container_probe(nvml, {"bytes": None})
    nvml.run(HOST_PID_OF_TRAINER, 400 * 1024**2)  # a trainer just starting, context-sized
    assert not probe.is_open(0.0)
    assert HOST_PID_OF_TRAINER not in probe.own_pids


def test_two_processes_that_could_be_sidecar_are_both_foreign(nvml):
    probe = _container_probe(nvml, {"bytes": 0})
    nvml.run(HOST_PID_OF_SIDECAR, 500 * 1024**2)
    nvml.run(HOST_PID_OF_TRAINER, 600 * 1024**2)
    assert not probe.is_open(0.0)
    assert probe.own_pids == {OWN_PID}  # ambiguous: never guessed


def test_a_visible_process_is_never_taken_for_sidecar(nvml):
    probe = NvmlProbe(
        0,
        required_free_bytes=None,
        dwell_seconds=0.0,
        nvml=nvml,
        own_pids=[OWN_PID],
        own_usage=lambda: 0,
        visible=lambda pid: True,  # the trainer in the same PID namespace
    )
    nvml.run(TRAINER_PID, 500 * 1024**2)
    assert not probe.is_open(0.0)


def test_namespace_pids_reads_every_level_of_nspid(tmp_path):
    from sidecar.render.nvml import namespace_pids

    status = tmp_path / "status"
    status.write_text("Name:\tpython\nNSpid:\t987654\t42\n")
    assert {987654, 42, os.getpid()} <= namespace_pids(str(status))
    assert namespace_pids(str(tmp_path / "missing")) == {os.getpid()}
