"""Device and dtype choice and the CUDA helpers; CUDA is faked except in the tests marked `cuda`."""

from __future__ import annotations

import logging

import pytest
import torch

from sidecar.errors import SidecarError
from sidecar.render import devices
from sidecar.render.devices import is_cuda_oom, resolve_device, resolve_dtype

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture
def fake_cuda(monkeypatch):
    """torch sees `count` CUDA devices; `set_device` calls are recorded."""
    state = {"count": 2, "set": []}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: state["count"] > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: state["count"])
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: state["set"].append(device))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU")
    return state


# --- resolve_device -------------------------------------------------------------


def test_gpu_index_picks_that_card_only(fake_cuda, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    assert resolve_device(device=None, gpu=1) == torch.device("cuda", 1)
    assert fake_cuda["set"] == [torch.device("cuda", 1)]


def test_gpu_out_of_range_names_visible_devices(fake_cuda, monkeypatch):
    fake_cuda["count"] = 1
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    with pytest.raises(SidecarError) as info:
        resolve_device(device=None, gpu=1)
    assert "`--gpu 1` but only 1 CUDA device is visible (CUDA_VISIBLE_DEVICES=0)" in str(info.value)
    assert fake_cuda["set"] == []


def test_gpu_out_of_range_without_visible_devices_variable(fake_cuda, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    with pytest.raises(
        SidecarError, match=r"only 2 CUDA devices are visible \(CUDA_VISIBLE_DEVICES is unset\)"
    ):
        resolve_device(device=None, gpu=5)


def test_negative_gpu_is_refused(fake_cuda):
    with pytest.raises(SidecarError, match="`--gpu` must be"):
        resolve_device(device=None, gpu=-1)


def test_default_is_first_gpu_when_cuda_is_there(fake_cuda, caplog):
    with caplog.at_level(logging.INFO, logger="sidecar.render"):
        assert resolve_device(device=None, gpu=None) == torch.device("cuda", 0)
    assert "rendering on cuda:0" in caplog.text


def test_default_is_cpu_without_cuda(fake_cuda, caplog):
    fake_cuda["count"] = 0
    with caplog.at_level(logging.INFO, logger="sidecar.render"):
        assert resolve_device(device=None, gpu=None) == torch.device("cpu")
    assert "rendering on the CPU" in caplog.text


def test_cpu_works_everywhere(fake_cuda):
    assert resolve_device(device="cpu", gpu=None) == torch.device("cpu")
    fake_cuda["count"] = 0
    assert resolve_device(device="cpu", gpu=None) == torch.device("cpu")
    assert fake_cuda["set"] == []


@pytest.mark.parametrize("kwargs", [{"device": None, "gpu": 0}, {"device": "cuda", "gpu": None}])
def test_cuda_asked_but_missing_is_an_error(fake_cuda, kwargs):
    fake_cuda["count"] = 0
    with pytest.raises(SidecarError, match=r"needs CUDA, but .*--device cpu"):
        resolve_device(**kwargs)


def test_device_string_with_index(fake_cuda):
    assert resolve_device(device="cuda:1", gpu=None) == torch.device("cuda", 1)
    assert resolve_device(device="cuda:1", gpu=1) == torch.device("cuda", 1)


@pytest.mark.parametrize(
    ("device", "gpu", "message"),
    [("cpu", 1, "disagree"), ("cuda:0", 1, "different cards"), ("mps", None, "must be `cpu`")],
)
def test_conflicting_or_unknown_device(fake_cuda, device, gpu, message):
    with pytest.raises(SidecarError, match=message):
        resolve_device(device=device, gpu=gpu)


# --- resolve_dtype --------------------------------------------------------------


def test_auto_dtype_on_cpu_is_fp32():
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32


@pytest.mark.parametrize(
    ("major", "expected"), [(9, torch.bfloat16), (8, torch.bfloat16), (7, torch.float16)]
)
def test_auto_dtype_on_cuda_follows_native_bf16(monkeypatch, major, expected):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (major, 0))
    assert resolve_dtype("auto", torch.device("cuda", 0)) == expected


@pytest.mark.parametrize(
    ("name", "expected"), [("bf16", torch.bfloat16), ("fp16", torch.float16), ("FP32", torch.float32)]
)
def test_explicit_dtype_wins(monkeypatch, name, expected):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    assert resolve_dtype(name, torch.device("cuda", 0)) == expected


def test_fp16_on_cpu_is_obeyed_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="sidecar.render"):
        assert resolve_dtype("fp16", torch.device("cpu")) == torch.float16
    assert "slower" in caplog.text


def test_unknown_dtype():
    with pytest.raises(SidecarError, match=r"`dtype` must be one of auto, bf16, fp16, fp32, got 'int8'"):
        resolve_dtype("int8", torch.device("cpu"))


# --- CUDA helpers ---------------------------------------------------------------


def test_is_cuda_oom():
    assert is_cuda_oom(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_cuda_oom(RuntimeError("CUDA out of memory. Tried to allocate 20.00 MiB"))
    assert not is_cuda_oom(RuntimeError("expected all tensors to be on the same device"))
    assert not is_cuda_oom(ValueError("CUDA out of memory"))  # only runtime errors carry it
    try:
        try:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        except torch.cuda.OutOfMemoryError as inner:
            raise SidecarError("render failed") from inner
    except SidecarError as outer:
        assert is_cuda_oom(outer)


def test_measurements_are_zero_on_cpu():
    cpu = torch.device("cpu")
    devices.reset_peak(cpu)
    devices.free_cuda_cache(cpu)
    assert devices.peak_vram_bytes(cpu) == 0
    assert devices.allocated_bytes(cpu) == 0


def test_cuda_uuid_is_none_for_a_card_torch_cannot_see(fake_cuda):
    fake_cuda["count"] = 0
    assert devices.cuda_uuid(0) is None
    fake_cuda["count"] = 2
    assert devices.cuda_uuid(2) is None


# --- real CUDA ------------------------------------------------------------------


@pytest.mark.cuda
@needs_cuda
def test_oom_is_recognised_on_cuda():
    device = resolve_device(device=None, gpu=0)
    with pytest.raises(torch.cuda.OutOfMemoryError) as info:
        torch.empty(1 << 50, dtype=torch.uint8, device=device)
    assert is_cuda_oom(info.value)
    devices.free_cuda_cache(device)


def test_card_memory_for_sidecar_check_gpu(fake_cuda, monkeypatch):
    """`sidecar check --gpu 1`: the dtype `auto` means there, the card's free bytes, its name."""
    from sidecar.render.devices import card_memory

    fake_cuda["count"] = 2
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (11 * 1024**3, 16 * 1024**3))
    assert card_memory(1, "auto") == ("fp16", 11 * 1024**3, "cuda:1 (Fake GPU)")
    assert card_memory(1, "bf16")[0] == "bf16"
