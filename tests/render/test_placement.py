"""`Placement`: parking a pipeline off a shared card and back, only where there is a card."""

from __future__ import annotations

import torch

from sidecar.render import memory
from sidecar.render.memory import MemoryPolicy, Placement


def test_placement_parks_and_unparks_only_on_cuda(monkeypatch):
    moves: list[str] = []
    monkeypatch.setattr(memory, "park", lambda pipe, device=None: moves.append("park"))
    monkeypatch.setattr(memory, "unpark", lambda pipe, device, mode: moves.append(f"unpark:{mode}"))
    on_cpu = Placement(device=torch.device("cpu"), policy=MemoryPolicy("none"))
    on_cpu.park(object())
    assert moves == [] and not on_cpu.parked
    on_gpu = Placement(device=torch.device("cuda", 1), policy=MemoryPolicy("model"))
    on_gpu.park(object())
    on_gpu.park(object())  # parking twice moves nothing twice
    on_gpu.unpark(object())
    on_gpu.unpark(object())
    assert moves == ["park", "unpark:model"]
