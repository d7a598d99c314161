"""GPU choice and dtype: sidecar must never land on the trainer's card by accident.

`--gpu N` means cuda:N among the visible devices and nothing else; `--dtype auto` is
bf16 on cards with native bf16, fp16 on older ones, fp32 on the CPU. Also the CUDA
helpers every part of the render stage shares: out-of-memory detection, the cache,
and the peak-memory counters the benchmarks read.
"""

from __future__ import annotations

import gc
import logging
import os

import torch

from sidecar.errors import SidecarError
from sidecar.settings import DTYPE_ALIASES, DTYPE_NAMES

logger = logging.getLogger("sidecar.render")

DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
BF16_MIN_COMPUTE_MAJOR = 8  # Ampere: native bf16; older cards emulate it slowly


def _visible_devices_note() -> str:
    value = os.environ.get("CUDA_VISIBLE_DEVICES")
    return "CUDA_VISIBLE_DEVICES is unset" if value is None else f"CUDA_VISIBLE_DEVICES={value}"


def _no_cuda_reason() -> str:
    if torch.version.cuda is None and getattr(torch.version, "hip", None) is None:
        return f"torch {torch.__version__} is a CPU-only build; install a CUDA build of torch"
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return f"{_visible_devices_note()} hides every GPU"
    return f"torch sees no CUDA device ({_visible_devices_note()}); check the NVIDIA driver with `nvidia-smi`"


def _parse_device(device: str) -> tuple[str, int | None]:
    text = device.strip().lower()
    if text == "cpu":
        return "cpu", None
    if text == "cuda":
        return "cuda", None
    if text.startswith("cuda:") and text[5:].isdigit():
        return "cuda", int(text[5:])
    raise SidecarError(f"`--device` must be `cpu`, `cuda` or `cuda:N`, got {device!r}")


def resolve_device(*, device: str | None, gpu: int | None) -> torch.device:
    """The torch device to render on, checked; CUDA devices also become torch's current device.

    `gpu=N` means cuda:N among the visible devices (as torch counts them, after
    `CUDA_VISIBLE_DEVICES`) and nothing else; with neither argument cuda:0 is used
    when CUDA is available, else the CPU. Setting the current device makes stray
    allocations (a `.cuda()` without index in a library) land on the chosen card
    rather than on cuda:0, which may be the trainer's.
    """
    if gpu is not None and gpu < 0:
        raise SidecarError(f"`--gpu` must be a CUDA device index >= 0, got {gpu}")
    kind, index = _parse_device(device) if device is not None else (None, None)
    if kind == "cpu" and gpu is not None:
        raise SidecarError(f"`--device cpu` and `--gpu {gpu}` disagree; give one of them")
    if kind == "cuda" and gpu is not None and index is not None and index != gpu:
        raise SidecarError(f"`--device {device}` and `--gpu {gpu}` name different cards; give one of them")
    if kind == "cpu":
        logger.info("rendering on the CPU (--device cpu)")
        return torch.device("cpu")

    wanted = gpu if gpu is not None else index
    asked = f"`--gpu {gpu}`" if gpu is not None else f"`--device {device}`" if device else None
    if not torch.cuda.is_available():
        if asked is None:
            logger.info("no CUDA device available (%s); rendering on the CPU", _no_cuda_reason())
            return torch.device("cpu")
        raise SidecarError(f"{asked} needs CUDA, but {_no_cuda_reason()}; or render with `--device cpu`")

    count = torch.cuda.device_count()
    chosen = 0 if wanted is None else wanted
    if chosen >= count:
        plural = "device is" if count == 1 else "devices are"
        raise SidecarError(
            f"{asked or f'`cuda:{chosen}`'} but only {count} CUDA {plural} visible "
            f"({_visible_devices_note()}); indices count from 0 among the visible devices"
        )
    result = torch.device("cuda", chosen)
    torch.cuda.set_device(result)
    how = "as asked" if asked else "the first visible GPU; pass --gpu N to choose"
    logger.info("rendering on %s (%s, %s; %s)", result, _device_name(result), _visible_devices_note(), how)
    return result


def _device_name(device: torch.device) -> str:
    try:
        return torch.cuda.get_device_name(device)
    except (RuntimeError, AssertionError):  # fakes in tests, a card that vanished
        return "unknown GPU"


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """The weights' dtype: `auto` is bf16 on cards with native bf16, fp16 on older cards, fp32 on CPU.

    An explicit `bf16`, `fp16` or `fp32` is obeyed everywhere; fp16 on the CPU works
    with torch >= 2.4 but is far slower than fp32, so it is obeyed with a warning.
    """
    name = dtype.strip().lower()
    name = DTYPE_ALIASES.get(name, name)
    if name != "auto":
        if name not in DTYPES:
            raise SidecarError(f"`dtype` must be one of {', '.join(DTYPE_NAMES)}, got {dtype!r}")
        chosen = DTYPES[name]
        if device.type == "cpu" and chosen == torch.float16:
            logger.warning("dtype fp16 on the CPU is much slower than fp32 and some ops upcast; obeying it")
        return chosen
    if device.type != "cuda":
        return torch.float32
    if supports_native_bf16(device):
        return torch.bfloat16
    logger.info(
        "%s has no native bf16 (compute capability < %s.0); using fp16", device, BF16_MIN_COMPUTE_MAJOR
    )
    return torch.float16


def supports_native_bf16(device: torch.device) -> bool:
    """Whether `device` computes bf16 natively (emulated bf16 on older cards is slower than fp16)."""
    major, _minor = torch.cuda.get_device_capability(device)
    return major >= BF16_MIN_COMPUTE_MAJOR


def is_cuda_oom(exc: BaseException) -> bool:
    """Whether `exc` (or an exception it was raised from) is CUDA running out of memory."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, torch.cuda.OutOfMemoryError):
            return True
        if isinstance(current, RuntimeError) and "CUDA out of memory" in str(current):
            return True
        current = current.__cause__ or current.__context__
    return False


def free_cuda_cache(device: torch.device | None = None) -> None:
    """Drop dead tensors and hand the CUDA cache back to the driver (a no-op off CUDA).

    `device=None` means torch's current CUDA device, if there is one.
    """
    gc.collect()
    if not torch.cuda.is_available():
        return
    if device is None:
        torch.cuda.empty_cache()
    elif torch.device(device).type == "cuda":
        with torch.cuda.device(device):
            torch.cuda.empty_cache()


def peak_vram_bytes(device: torch.device) -> int:
    """Peak bytes allocated by torch on `device` since the last `reset_peak` (0 off CUDA)."""
    device = torch.device(device)
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0


def reset_peak(device: torch.device) -> None:
    """Start a new peak measurement on `device` (a no-op off CUDA)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def allocated_bytes(device: torch.device) -> int:
    """Bytes torch holds in tensors on `device` now (0 off CUDA)."""
    device = torch.device(device)
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def cuda_uuid(index: int) -> str | None:
    """torch's UUID of visible CUDA device `index` (to find the same card in NVML), or None."""
    if torch.cuda.is_available() and index < torch.cuda.device_count():
        return str(torch.cuda.get_device_properties(index).uuid)
    return None


def card_memory(gpu: int, dtype: str) -> tuple[str, int, str]:
    """For `sidecar check --gpu N`: the dtype `dtype` means on cuda:N, its free bytes, its name."""
    device = resolve_device(device=None, gpu=gpu)
    chosen = resolve_dtype(dtype, device)
    free_bytes, _total = torch.cuda.mem_get_info(device)
    name = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[chosen]
    return name, int(free_bytes), f"{device} ({_device_name(device)})"
