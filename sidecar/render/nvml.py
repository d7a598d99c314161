"""NVML, for `--share-gpu N`: is any process but sidecar computing on the card, or is memory free?

pynvml (package nvidia-ml-py, the `nvml` extra) is imported only when a probe is built.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sidecar.errors import SidecarError

logger = logging.getLogger("sidecar.slots")

DWELL_SECONDS = 5.0  # a trainer between two steps looks idle for a moment; wait this long
NVML_EXTRA_HINT = "install it with `pip install 'sidecar[nvml]'` (the nvidia-ml-py package)"
GIB = 1024**3
# NVML counts a process's CUDA context (and cuBLAS workspaces) besides what torch reserves:
# sidecar's own process shows torch's reserved bytes plus at most this much.
CONTEXT_SLACK_BYTES = 3 * GIB // 2


def load_nvml() -> Any:
    """The `pynvml` module (package nvidia-ml-py), or a SidecarError naming the extra."""
    try:
        import pynvml
    except ImportError as exc:
        raise SidecarError(
            f"`--share-gpu` watches the card through NVML, but pynvml is missing; {NVML_EXTRA_HINT}"
        ) from exc
    return pynvml


def nvml_init(nvml: Any) -> None:
    try:
        nvml.nvmlInit()
    except Exception as exc:  # pynvml.NVMLError_LibraryNotFound, _DriverNotLoaded, ...
        raise SidecarError(f"NVML cannot start ({exc}); check the NVIDIA driver with `nvidia-smi`") from exc


def process_name(pid: int) -> str | None:
    """The command name of `pid` from /proc, or None where it cannot be seen (another PID namespace)."""
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip() or None
    except OSError:
        return None


def namespace_pids(status_path: str = "/proc/self/status") -> set[int]:
    """This process's PID in every PID namespace /proc shows (`NSpid`), and `os.getpid()`.

    Inside a container NVML reports the host's PIDs. Where /proc shows the outer namespace
    too (nested namespaces, some runtimes) `NSpid` lists the host PID; where it does not,
    `NvmlProbe` learns it from the memory the process uses (`own_host_pid`).
    """
    pids = {os.getpid()}
    try:
        for line in Path(status_path).read_text().splitlines():
            if line.startswith("NSpid:"):
                pids.update(int(value) for value in line.split()[1:])
    except (OSError, ValueError):
        pass
    return pids


def torch_reserved_bytes() -> int | None:
    """What torch holds on its current CUDA card, or None while this process has no CUDA context."""
    torch = sys.modules.get("torch")  # never import torch for this: no context, nothing held
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    return int(torch.cuda.memory_reserved())


def pid_is_visible(pid: int) -> bool:
    """Whether `pid` is a process of this PID namespace (a container sees only its own)."""
    return Path(f"/proc/{pid}").exists()


def _as_text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _normal_uuid(value: Any) -> str:
    text = _as_text(value).strip().lower()
    return text[4:] if text.startswith("gpu-") else text


def nvml_index_for_cuda(cuda_index: int, *, nvml: Any, cuda_uuid: str | None = None) -> int:
    """The NVML (nvidia-smi) index of the card torch calls cuda:`cuda_index` (NVML initialised).

    The two differ when `CUDA_VISIBLE_DEVICES` hides cards or when CUDA orders them
    fastest-first. Matched by UUID when `cuda_uuid` is given (torch's
    `get_device_properties(i).uuid`), else through `CUDA_VISIBLE_DEVICES` (indices or
    UUIDs), else taken as is.
    """
    count = nvml.nvmlDeviceGetCount()
    uuids = [_normal_uuid(nvml.nvmlDeviceGetUUID(nvml.nvmlDeviceGetHandleByIndex(i))) for i in range(count)]
    if cuda_uuid:
        wanted = _normal_uuid(cuda_uuid)
        if wanted in uuids:
            return uuids.index(wanted)
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:
        entries = [entry.strip() for entry in visible.split(",") if entry.strip()]
        if cuda_index < len(entries):
            entry = entries[cuda_index]
            if entry.isdigit():
                return int(entry)
            matches = [i for i, uuid in enumerate(uuids) if uuid.startswith(_normal_uuid(entry))]
            if len(matches) == 1:
                return matches[0]
    return cuda_index


@dataclass(frozen=True)
class ForeignProcess:
    """A compute process on the card that is not sidecar."""

    pid: int
    used_bytes: int | None
    name: str | None

    def __str__(self) -> str:
        return f"process {self.pid}" + (f" ({self.name})" if self.name else "")


class NvmlProbe:
    """Open once the card has been clear for `dwell_seconds`.

    Clear means: no compute process other than our own on the card, OR (when
    `required_free_bytes` is given) at least that much free memory. The second half
    lets a render run beside a trainer on a card roomy enough for both, and beside
    stray processes holding a little memory; leave `required_free_bytes` None to
    render only on an idle card. The dwell time keeps a trainer that pauses between
    steps or between epochs from being taken for finished. Closing is immediate.

    `own_pids` are ignored as foreign (default: this process in every PID namespace /proc
    shows, `namespace_pids`). In a container NVML reports host PIDs that /proc does not
    show: the probe then takes as sidecar's own the one process, invisible from here, whose
    memory is what torch holds in this process plus its CUDA context (`own_usage`, within
    CONTEXT_SLACK_BYTES), and remembers its PID. NVML errors close the slot and are reported
    by `describe`.
    """

    def __init__(
        self,
        gpu_index: int,
        *,
        required_free_bytes: int | None,
        dwell_seconds: float = DWELL_SECONDS,
        own_pids: Iterable[int] | None = None,
        nvml: Any = None,
        label: str | None = None,
        own_usage: Callable[[], int | None] = torch_reserved_bytes,
        visible: Callable[[int], bool] = pid_is_visible,
    ) -> None:
        if dwell_seconds < 0:
            raise ValueError(f"`dwell_seconds` must be >= 0, got {dwell_seconds}")
        self.gpu_index = gpu_index
        self.required_free_bytes = required_free_bytes
        self.dwell_seconds = dwell_seconds
        self.own_pids = set(own_pids) if own_pids is not None else namespace_pids()
        self.own_usage = own_usage
        self.visible = visible
        self.label = label or f"GPU {gpu_index}"
        self._nvml = nvml if nvml is not None else load_nvml()
        self._handle: Any = None
        self._clear_since: float | None = None
        self._state = "not checked yet"

    def _device(self) -> Any:
        if self._handle is None:
            nvml = self._nvml
            nvml_init(nvml)
            count = nvml.nvmlDeviceGetCount()
            if not 0 <= self.gpu_index < count:
                raise SidecarError(f"`--share-gpu {self.gpu_index}` but NVML sees {count} GPU(s)")
            self._handle = nvml.nvmlDeviceGetHandleByIndex(self.gpu_index)
        return self._handle

    def foreign_processes(self) -> list[ForeignProcess]:
        """Compute processes on the card other than ours."""
        infos = [
            info
            for info in self._nvml.nvmlDeviceGetComputeRunningProcesses(self._device())
            if info.pid not in self.own_pids
        ]
        own = self.own_host_pid(infos)
        found = []
        for info in infos:
            if info.pid == own:
                continue
            used = getattr(info, "usedGpuMemory", None)
            found.append(
                ForeignProcess(info.pid, used if isinstance(used, int) else None, process_name(info.pid))
            )
        return found

    def own_host_pid(self, infos: list[Any]) -> int | None:
        """sidecar's own process among `infos` when NVML reports it under a host PID, learnt once.

        Only while this process holds a CUDA context, and only when exactly one process
        invisible from this PID namespace uses what torch holds here plus a context.
        """
        reserved = self.own_usage()
        if reserved is None:
            return None
        matches = [
            info.pid
            for info in infos
            if not self.visible(info.pid)
            and isinstance(getattr(info, "usedGpuMemory", None), int)
            and reserved <= info.usedGpuMemory <= reserved + CONTEXT_SLACK_BYTES
        ]
        if len(matches) != 1:
            return None
        self.own_pids.add(matches[0])
        logger.info(
            "%s: process %s is sidecar itself, seen from outside its PID namespace (a container)",
            self.label,
            matches[0],
        )
        return matches[0]

    def is_open(self, now: float) -> bool:
        try:
            foreign = self.foreign_processes()
            free = int(self._nvml.nvmlDeviceGetMemoryInfo(self._device()).free)
        except SidecarError:
            raise
        except Exception as exc:  # NVMLError and friends: the card may be busy resetting
            self._clear_since = None
            self._state = f"waiting for a slot: NVML query of {self.label} failed ({exc})"
            return False
        enough = self.required_free_bytes is not None and free >= self.required_free_bytes
        if foreign and not enough:
            self._clear_since = None
            need = ""
            if self.required_free_bytes is not None:
                need = f"; {free / GIB:.1f} GiB free < {self.required_free_bytes / GIB:.1f} GiB needed"
            first = foreign[0]
            used = f" ({first.used_bytes / GIB:.1f} GiB)" if first.used_bytes else ""
            self._state = f"waiting for a slot: {first} is using {self.label}{used}{need}"
            if len(foreign) > 1:
                self._state += f" (and {len(foreign) - 1} more)"
            return False
        why = "no other compute process" if not foreign else f"{free / GIB:.1f} GiB free beside {foreign[0]}"
        if self._clear_since is None:
            self._clear_since = now
        waited = now - self._clear_since
        if waited < self.dwell_seconds:
            self._state = (
                f"slot opening: {why} on {self.label} for {waited:.1f} of {self.dwell_seconds:.1f} s"
            )
            return False
        self._state = f"slot open: {why} on {self.label}"
        return True

    def describe(self) -> str:
        return self._state

    def hold(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def close(self) -> None:
        """Shut NVML down (once per `nvmlInit`)."""
        if self._handle is not None:
            self._handle = None
            with contextlib.suppress(Exception):
                self._nvml.nvmlShutdown()
