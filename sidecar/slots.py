"""Time slots on a one-GPU box (`--share-gpu N`): render only while the trainer leaves the card.

A probe answers one question, "may a render start now?", from the outside world
(NVML's process list, a file, a lock); `SlotGate` turns those answers into
open/closed states with reasons and logs each transition. Time is always passed
in (`now`, seconds, any monotonic clock), nothing here sleeps, so the daemon's
loop and the tests drive it alike.

The daemon asks the gate before each image. While the slot is closed it parks the
pipeline (`sidecar.devices.park`) and holds no VRAM; a slot that closes during an
image does not stop that image, it is finished first, then the GPU is released.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

from sidecar.errors import SidecarError, TransientError

logger = logging.getLogger("sidecar.slots")

DWELL_SECONDS = 5.0  # a trainer between two steps looks idle for a moment; wait this long
SLOT_POLL_SECONDS = 2.0  # how often the daemon should ask a closed gate again
NVML_EXTRA_HINT = "install it with `pip install 'sidecar[nvml]'` (the nvidia-ml-py package)"
GIB = 1024**3

FileMode = Literal["exists", "absent", "lock"]


class SlotClosedError(TransientError):
    """The slot closed between the check and the render (a lock was taken first)."""


@runtime_checkable
class SlotProbe(Protocol):
    """Tells whether a render may start now."""

    def is_open(self, now: float) -> bool:
        """Whether a render may start at time `now` (seconds, monotonic)."""
        ...

    def describe(self) -> str:
        """The state at the last `is_open`, for logs and `sidecar status`."""
        ...

    def hold(self) -> contextlib.AbstractContextManager[None]:
        """Keep the slot for the duration of one render (a no-op for probes that cannot)."""
        ...


class AlwaysOpen:
    """The dual-GPU case: the card is ours alone, so the slot never closes."""

    def __init__(self, label: str = "a GPU of its own") -> None:
        self.label = label

    def is_open(self, now: float) -> bool:
        return True

    def describe(self) -> str:
        return f"always open: rendering on {self.label}"

    def hold(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()


# ---------------------------------------------------------------------------------
# NVML: no other compute process on the card, or enough free memory
# ---------------------------------------------------------------------------------


def load_nvml() -> Any:
    """The `pynvml` module (package nvidia-ml-py), or a SidecarError naming the extra."""
    try:
        import pynvml
    except ImportError as exc:
        raise SidecarError(
            f"`--share-gpu` watches the card through NVML, but pynvml is missing; {NVML_EXTRA_HINT}"
        ) from exc
    return pynvml


def _nvml_init(nvml: Any) -> None:
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

    `own_pids` are ignored as foreign (default: this process). In a container without
    the host's PID namespace NVML reports host PIDs, so pass the host PID or rely on
    `required_free_bytes`. NVML errors close the slot and are reported by `describe`.
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
    ) -> None:
        if dwell_seconds < 0:
            raise ValueError(f"`dwell_seconds` must be >= 0, got {dwell_seconds}")
        self.gpu_index = gpu_index
        self.required_free_bytes = required_free_bytes
        self.dwell_seconds = dwell_seconds
        self.own_pids = frozenset(own_pids) if own_pids is not None else frozenset({os.getpid()})
        self.label = label or f"GPU {gpu_index}"
        self._nvml = nvml if nvml is not None else load_nvml()
        self._handle: Any = None
        self._clear_since: float | None = None
        self._state = "not checked yet"

    def _device(self) -> Any:
        if self._handle is None:
            nvml = self._nvml
            _nvml_init(nvml)
            count = nvml.nvmlDeviceGetCount()
            if not 0 <= self.gpu_index < count:
                raise SidecarError(f"`--share-gpu {self.gpu_index}` but NVML sees {count} GPU(s)")
            self._handle = nvml.nvmlDeviceGetHandleByIndex(self.gpu_index)
        return self._handle

    def foreign_processes(self) -> list[ForeignProcess]:
        """Compute processes on the card other than ours."""
        found = []
        for info in self._nvml.nvmlDeviceGetComputeRunningProcesses(self._device()):
            if info.pid in self.own_pids:
                continue
            used = getattr(info, "usedGpuMemory", None)
            found.append(
                ForeignProcess(info.pid, used if isinstance(used, int) else None, process_name(info.pid))
            )
        return found

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


# ---------------------------------------------------------------------------------
# Files: a marker a trainer's hook creates or removes, or a lock it holds
# ---------------------------------------------------------------------------------


class FileProbe:
    """Open while a file exists (`exists`), while it does not (`absent`), or while a lock is free (`lock`).

    `exists` / `absent` suit a trainer hook or a pause switch that touches and removes
    a marker. `lock` uses `flock` on `path` (created if missing): the trainer holds it
    while it needs the GPU, e.g. `flock /run/sidecar/gpu0.lock python train.py`. The
    check takes the lock and lets it go at once; `hold()` keeps it for one render, so a
    trainer starting meanwhile waits for the image to finish rather than meeting a full
    card. Marker files cannot be held: a marker removed mid-image closes the slot only
    for the next image.
    """

    def __init__(self, path: str | Path, *, mode: FileMode = "exists") -> None:
        if mode not in ("exists", "absent", "lock"):
            raise ValueError(f"`mode` must be 'exists', 'absent' or 'lock', got {mode!r}")
        self.path = Path(path)
        self.mode = mode
        self._held_fd: int | None = None
        self._state = "not checked yet"

    def is_open(self, now: float) -> bool:
        if self.mode == "lock":
            return self._lock_is_free()
        present = self.path.exists()
        is_open = present if self.mode == "exists" else not present
        state = "exists" if present else "does not exist"
        self._state = f"{'slot open' if is_open else 'waiting for a slot'}: {self.path} {state}"
        return is_open

    def _open_fd(self) -> int:
        return os.open(self.path, os.O_RDONLY | os.O_CREAT, 0o666)

    def _lock_is_free(self) -> bool:
        if self._held_fd is not None:
            self._state = f"slot open: sidecar holds the lock {self.path}"
            return True
        try:
            fd = self._open_fd()
        except OSError as exc:
            self._state = f"waiting for a slot: cannot open the lock {self.path} ({exc.strerror})"
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            self._state = f"waiting for a slot: another process holds the lock {self.path}"
            return False
        finally:
            os.close(fd)  # closing the descriptor also drops a lock taken through it
        self._state = f"slot open: the lock {self.path} is free"
        return True

    def describe(self) -> str:
        return self._state

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        """Keep the lock for one render; raises SlotClosedError if it was taken since the check."""
        if self.mode != "lock" or self._held_fd is not None:
            yield
            return
        fd = self._open_fd()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            raise SlotClosedError(f"the lock {self.path} was taken between the check and the render") from exc
        self._held_fd = fd
        try:
            yield
        finally:
            self._held_fd = None
            os.close(fd)


class AllOpen:
    """Open only while every probe is open (e.g. NVML and a pause file)."""

    def __init__(self, probes: Iterable[SlotProbe]) -> None:
        self.probes = tuple(probes)
        if not self.probes:
            raise ValueError("`probes` must not be empty")
        self._closed: SlotProbe | None = None

    def is_open(self, now: float) -> bool:
        self._closed = None
        for probe in self.probes:  # ask every probe, so each one's dwell clock runs
            if not probe.is_open(now) and self._closed is None:
                self._closed = probe
        return self._closed is None

    def describe(self) -> str:
        if self._closed is not None:
            return self._closed.describe()
        return "; ".join(probe.describe() for probe in self.probes)

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            for probe in self.probes:
                stack.enter_context(probe.hold())
            yield


# ---------------------------------------------------------------------------------
# The gate the daemon asks before each image
# ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class SlotState:
    """The gate's answer: may a render start, why, and whether that changed just now."""

    is_open: bool
    reason: str
    changed: bool


class SlotGate:
    """Asks a probe before each image and logs when the slot opens or closes."""

    def __init__(self, probe: SlotProbe) -> None:
        self.probe = probe
        self._open: bool | None = None
        self._since: float | None = None

    def wait_state(self, now: float, *, in_checkpoint: bool = False) -> SlotState:
        """Whether a render may start at `now`.

        `in_checkpoint` says some images of the current checkpoint are done and more
        are due; a slot closing then is logged as such, since that checkpoint's
        images will arrive in two parts.
        """
        is_open = self.probe.is_open(now)
        reason = self.probe.describe()
        changed = is_open != self._open
        if changed:
            if is_open:
                waited = (
                    "" if self._since is None or self._open is None else f" after {now - self._since:.0f} s"
                )
                logger.info("slot opened%s: %s", waited, reason)
            elif in_checkpoint:
                logger.info(
                    "slot closed mid-checkpoint: finishing the current image, then releasing the GPU (%s)",
                    reason,
                )
            elif self._open is None:
                logger.info("%s", reason)
            else:
                logger.info("slot closed: %s", reason)
            self._open = is_open
            self._since = now
        return SlotState(is_open=is_open, reason=reason, changed=changed)

    def status(self, now: float) -> str:
        """One line for `sidecar status`: the last state and how long it has lasted."""
        if self._open is None or self._since is None:
            return "slot not checked yet"
        return f"{self.probe.describe()} (for {now - self._since:.0f} s)"

    def hold(self) -> contextlib.AbstractContextManager[None]:
        """Keep the slot during one render (see the probe's `hold`)."""
        return self.probe.hold()


def build_probe(
    *,
    share_gpu: int | None,
    slot_file: str | Path | None = None,
    slot_file_mode: FileMode = "exists",
    required_free_bytes: int | None = None,
    dwell_seconds: float = DWELL_SECONDS,
    nvml: Any = None,
    cuda_uuid: str | None = None,
) -> SlotProbe:
    """The probe for the command line's options: NVML for `--share-gpu N`, a file, both, or none.

    `share_gpu` is a CUDA index as torch counts it; it is mapped to NVML's index
    (see `nvml_index_for_cuda`; pass torch's UUID of the card as `cuda_uuid`).
    """
    probes: list[SlotProbe] = []
    if share_gpu is not None:
        nvml = nvml if nvml is not None else load_nvml()
        _nvml_init(nvml)
        try:
            index = nvml_index_for_cuda(share_gpu, nvml=nvml, cuda_uuid=cuda_uuid)
        finally:
            nvml.nvmlShutdown()
        probe = NvmlProbe(
            index,
            required_free_bytes=required_free_bytes,
            dwell_seconds=dwell_seconds,
            nvml=nvml,
            label=f"cuda:{share_gpu}",
        )
        probes.append(probe)
    if slot_file is not None:
        probes.append(FileProbe(slot_file, mode=slot_file_mode))
    if not probes:
        return AlwaysOpen()
    return probes[0] if len(probes) == 1 else AllOpen(probes)
