"""Which files are LoRA checkpoints, at which step, and when they are whole.

Trainers write checkpoints in place (not by rename), prune old ones, and write
optimizer states, EMA copies and sample images beside them. This module tells
those apart by name alone (`recognise`, pure on the path), reads the safetensors
header without loading tensors (`read_header`, `completeness`), and decides when a
file has stopped changing (`ReadinessTracker`, driven by explicit time so tests
need no sleeps). Nothing here imports torch or watchdog.

Layouts recognised (step from the name unless noted):

- ai-toolkit: `{name}_{step:09d}.safetensors`; final `{name}.safetensors`.
- kohya sd-scripts: `{name}-step{step:08d}.safetensors`; per epoch
  `{name}-{epoch:06d}.safetensors` (step from `ss_steps` metadata); final
  `{name}.safetensors`. Its `*-state` folders hold optimizer states, not LoRAs.
- OneTrainer: `save/{prefix}{YYYY-MM-DD_HH-MM-SS}-save-{step}-{epoch}-{epoch_step}.safetensors`.
- SimpleTuner and diffusers' scripts: `checkpoint-{step}/pytorch_lora_weights.safetensors`.
- EriDiffusion: `checkpoint-{step}/{sdxl|sd35|flux}_lora.safetensors` (ready only once
  `training_state.json`, written last, exists), `{model}_lora_step{N}.safetensors`,
  final `{model}_lora_final.safetensors`.

A final file without a step in its name gets one from the header metadata where the
trainer wrote it (`resolve_step`): kohya `ss_steps`/`ss_epoch`, ai-toolkit
`training_info` JSON `step`/`epoch`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import struct
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath
from typing import Literal

from sidecar.architectures import ARCH_ALIASES, Arch
from sidecar.errors import CheckpointError, ConfigError

logger = logging.getLogger("sidecar.checkpoints")

Layout = Literal["ai-toolkit", "kohya", "onetrainer", "diffusers", "eridiffusion", "final", "pattern"]

SAFETENSORS_SUFFIX = ".safetensors"
PICKLE_SUFFIXES = frozenset({".ckpt", ".pt", ".pth", ".bin"})
# `.bin` is too common a name for other things (text encoders, optimizer states) to
# take a bare `{name}.bin` as a final LoRA; it counts only in a known layout.
PICKLE_FINAL_SUFFIXES = frozenset({".ckpt", ".pt", ".pth"})

HEADER_LENGTH_BYTES = 8  # little-endian u64 in front of the JSON header
MAX_HEADER_BYTES = 100 * 1024 * 1024  # a larger declared header is corrupt, never allocated
HASH_CHUNK_BYTES = 1024 * 1024

SETTLE_SECONDS = 1.0
ABANDON_SECONDS = 120.0

ERIDIFFUSION_MARKER = "training_state.json"

# Folder names whose contents are never LoRAs to render (compared lower-case).
_EXCLUDED_DIRS = frozenset(
    {
        "samples",
        "sample",
        "ema",
        "backup",
        "backups",
        "logs",
        "log",
        "tensorboard",
        "cache",
        "latent_cache",
        "_latent_cache",
        "optimizer",
        "__pycache__",
    }
)
# Tokens in a file name that mark a non-LoRA file (split on `_`, `-`, `.`; whole tokens only,
# so `cinema_lora` is kept). A run named with one of them needs a user `pattern`.
_EXCLUDED_TOKENS = frozenset({"optimizer", "optim", "ema", "scheduler", "scaler", "tmp", "temp", "partial"})
_TOKEN_SPLIT = re.compile(r"[_\-.]+")

_CHECKPOINT_DIR = re.compile(r"checkpoint-(?P<step>\d+)")
_DIFFUSERS_NAMES = frozenset({"pytorch_lora_weights"})
_ERIDIFFUSION_DIR_NAME = re.compile(r"(?P<model>[a-z0-9.]+)_lora")

_ONETRAINER = re.compile(
    r"(?P<name>.*?)(?P<timestamp>\d{4}-\d{2}-\d{2}_\d{2}-\d{2}-\d{2})-save-"
    r"(?P<step>\d+)-(?P<epoch>\d+)-(?P<epoch_step>\d+)"
)
_KOHYA_STEP = re.compile(r"(?P<name>.+)-step(?P<step>\d{8,})")
_KOHYA_EPOCH = re.compile(r"(?P<name>.+)-(?P<epoch>\d{6})")
_AI_TOOLKIT = re.compile(r"(?P<name>.+)_(?P<step>\d{9,})")
_ERIDIFFUSION_STEP = re.compile(r"(?P<name>.+)_lora_step(?P<step>\d+)")
_ERIDIFFUSION_FINAL = re.compile(r"(?P<name>.+)_lora_final")


@dataclass(frozen=True)
class Checkpoint:
    """One LoRA file a trainer wrote, as far as its path tells.

    `step` is None where the name has none (a final file, a kohya epoch file) until
    `resolve_step` reads the header. `marker` is a file the trainer writes after the
    LoRA; the checkpoint is ready only once it exists.
    """

    path: Path
    name: str  # run name from the file name, or the checkpoint folder name
    layout: Layout
    step: int | None
    epoch: int | None = None
    is_final: bool = False
    is_pickle: bool = False  # never loaded: pickle can run code; the renderer refuses it
    marker: Path | None = None
    arch: Arch | None = None  # where the name says it (EriDiffusion `flux_lora`)

    @property
    def pickle_message(self) -> str:
        """What to tell the user about a pickle checkpoint."""
        return (
            f"{self.path.name}: pickle checkpoints ({self.path.suffix}) are not loaded, "
            "because unpickling can run arbitrary code; save as safetensors "
            "(kohya: `--save_model_as safetensors`; diffusers scripts: `safe_serialization=True`)"
        )


def _arch_of(model: str) -> Arch | None:
    return ARCH_ALIASES.get(model.lower())


def is_excluded_folder(name: str) -> bool:
    """Whether a folder of this name never holds LoRAs to render (samples, EMA, hidden...)."""
    lowered = name.lower()
    return (
        name.startswith(".")
        or lowered in _EXCLUDED_DIRS
        or lowered.endswith("-state")
        or lowered.endswith("_state")
    )


def _is_excluded(rel: PurePosixPath) -> str | None:
    """Why a path is not a LoRA checkpoint, or None when nothing excludes it."""
    for part in rel.parts[:-1]:
        if part.startswith("."):
            return f"hidden folder {part!r}"
        if is_excluded_folder(part):
            return f"inside {part!r}"
    name = rel.name
    if name.startswith(".") or name.endswith("~"):
        return "hidden or temporary file"
    tokens = {t.lower() for t in _TOKEN_SPLIT.split(rel.stem) if t}
    bad = tokens & _EXCLUDED_TOKENS
    if bad:
        return f"name has {sorted(bad)[0]!r}"
    return None


def _relative(path: Path, root: Path) -> PurePosixPath:
    try:
        return PurePosixPath(path.relative_to(root).as_posix())
    except ValueError:
        return PurePosixPath(path.name)


def recognise(path: Path, *, root: Path, pattern: re.Pattern[str] | None = None) -> Checkpoint | None:
    """The checkpoint `path` is, or None when it is not a LoRA checkpoint.

    Pure on the path: reads nothing from disk. `root` is the watched output folder;
    layouts are matched on the path relative to it. A user `pattern` (a regex with a
    named `step` group, optional `epoch`) is tried first, on the relative POSIX path.
    """
    suffix = path.suffix.lower()
    is_pickle = suffix in PICKLE_SUFFIXES
    if suffix != SAFETENSORS_SUFFIX and not is_pickle:
        return None
    rel = _relative(path, root)

    if pattern is not None:
        if "step" not in pattern.groupindex:
            raise ConfigError(
                f"`pattern` must have a named group `step`, e.g. r'_(?P<step>\\d+)\\.safetensors$', "
                f"got {pattern.pattern!r}"
            )
        found = pattern.search(rel.as_posix())
        if found is not None and found.group("step") is not None:
            epoch = found.groupdict().get("epoch")
            return Checkpoint(
                path=path,
                name=path.stem,
                layout="pattern",
                step=int(found.group("step")),
                epoch=int(epoch) if epoch is not None else None,
                is_pickle=is_pickle,
            )

    excluded = _is_excluded(rel)
    if excluded is not None:
        logger.debug("%s is not a LoRA checkpoint: %s", path, excluded)
        return None
    stem = path.stem
    parent = rel.parent.name if len(rel.parts) > 1 else ""

    folder = _CHECKPOINT_DIR.fullmatch(parent)
    if folder is not None:
        return _in_checkpoint_dir(path, stem, parent, int(folder.group("step")), is_pickle)
    if stem in _DIFFUSERS_NAMES:  # diffusers / SimpleTuner final, at the top of output_dir
        return Checkpoint(path, parent or stem, "diffusers", None, is_final=True, is_pickle=is_pickle)
    return _by_name(path, stem, suffix, is_pickle)


def _in_checkpoint_dir(path: Path, stem: str, folder: str, step: int, is_pickle: bool) -> Checkpoint | None:
    """`checkpoint-{step}/…`: only the LoRA file itself counts; the rest is trainer state."""
    if stem in _DIFFUSERS_NAMES:
        return Checkpoint(path, folder, "diffusers", step, is_pickle=is_pickle)
    eri = _ERIDIFFUSION_DIR_NAME.fullmatch(stem)
    if eri is not None:
        return Checkpoint(
            path,
            folder,
            "eridiffusion",
            step,
            is_pickle=is_pickle,
            marker=path.parent / ERIDIFFUSION_MARKER,
            arch=_arch_of(eri.group("model")),
        )
    return None


def _by_name(path: Path, stem: str, suffix: str, is_pickle: bool) -> Checkpoint | None:
    """Flat layouts, told apart by the shape of the file name (most specific first)."""
    found = _ONETRAINER.fullmatch(stem)
    if found is not None:
        return Checkpoint(
            path,
            found.group("name").rstrip("-_") or "onetrainer",
            "onetrainer",
            int(found.group("step")),
            epoch=int(found.group("epoch")),
            is_pickle=is_pickle,
        )
    found = _KOHYA_STEP.fullmatch(stem)
    if found is not None:
        return Checkpoint(path, found.group("name"), "kohya", int(found.group("step")), is_pickle=is_pickle)
    found = _AI_TOOLKIT.fullmatch(stem)
    if found is not None:
        return Checkpoint(
            path, found.group("name"), "ai-toolkit", int(found.group("step")), is_pickle=is_pickle
        )
    found = _ERIDIFFUSION_STEP.fullmatch(stem)
    if found is not None:
        name = found.group("name")
        return Checkpoint(
            path, name, "eridiffusion", int(found.group("step")), is_pickle=is_pickle, arch=_arch_of(name)
        )
    found = _ERIDIFFUSION_FINAL.fullmatch(stem)
    if found is not None:
        name = found.group("name")
        return Checkpoint(
            path, name, "eridiffusion", None, is_final=True, is_pickle=is_pickle, arch=_arch_of(name)
        )
    found = _KOHYA_EPOCH.fullmatch(stem)
    if found is not None:
        return Checkpoint(
            path, found.group("name"), "kohya", None, epoch=int(found.group("epoch")), is_pickle=is_pickle
        )
    if is_pickle and suffix not in PICKLE_FINAL_SUFFIXES:
        return None
    # `{name}.safetensors`: the final save of ai-toolkit and kohya alike.
    return Checkpoint(path, stem, "final", None, is_final=True, is_pickle=is_pickle)


# --- the safetensors header ---------------------------------------------------------


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's entry in a safetensors header; offsets are relative to the data."""

    dtype: str
    shape: tuple[int, ...]
    data_offsets: tuple[int, int]


@dataclass(frozen=True)
class SafetensorsHeader:
    """The parsed header of a safetensors file: enough to check it without loading it."""

    header_bytes: int
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    data_bytes: int  # the end of the last tensor's data, as the header declares it
    file_bytes: int

    @property
    def expected_file_bytes(self) -> int:
        return HEADER_LENGTH_BYTES + self.header_bytes + self.data_bytes


@dataclass(frozen=True)
class Completeness:
    """Whether a file is whole right now, and why not. Never an error by itself:
    a file still being written is simply not whole yet."""

    whole: bool
    reason: str
    size: int  # bytes; -1 when the file is gone
    mtime_ns: int  # -1 when the file is gone
    exists: bool = True


class _NotWhole(Exception):
    """Internal: the header cannot be parsed (yet); carries the reason."""


def _parse_header(path: Path, size: int) -> SafetensorsHeader:
    """Parse the header of `path` (`size` bytes); raises `_NotWhole` with the reason."""
    if size == 0:
        raise _NotWhole("file is empty (0 bytes)")
    if size < HEADER_LENGTH_BYTES:
        raise _NotWhole(f"file has {size} bytes, fewer than the 8-byte header length")
    with path.open("rb") as handle:
        (header_bytes,) = struct.unpack("<Q", handle.read(HEADER_LENGTH_BYTES))
        if header_bytes > MAX_HEADER_BYTES:
            raise _NotWhole(
                f"header length field says {header_bytes} bytes, more than the "
                f"{MAX_HEADER_BYTES} allowed: not a safetensors file, or corrupt"
            )
        if HEADER_LENGTH_BYTES + header_bytes > size:
            raise _NotWhole(
                f"header says it is {header_bytes} bytes, file has only {size - HEADER_LENGTH_BYTES} after "
                "the length field"
            )
        raw = handle.read(header_bytes)
    try:
        parsed = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _NotWhole(f"header is not JSON ({exc})") from None
    if not isinstance(parsed, dict):
        raise _NotWhole(f"header is JSON but not an object (got {type(parsed).__name__})")

    available = size - HEADER_LENGTH_BYTES - header_bytes
    metadata: dict[str, str] = {}
    tensors: dict[str, TensorInfo] = {}
    data_bytes = 0
    for key, value in parsed.items():
        if key == "__metadata__":
            if not isinstance(value, dict):
                raise _NotWhole("header `__metadata__` is not an object")
            metadata = {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in value.items()}
            continue
        try:
            begin, end = (int(x) for x in value["data_offsets"])
            info = TensorInfo(str(value["dtype"]), tuple(int(x) for x in value["shape"]), (begin, end))
        except (KeyError, TypeError, ValueError):
            raise _NotWhole(f"header entry {key!r} lacks dtype/shape/data_offsets") from None
        if not 0 <= begin <= end:
            raise _NotWhole(f"tensor {key!r} has offsets out of range: {begin}..{end}")
        tensors[key] = info
        data_bytes = max(data_bytes, end)
    header = SafetensorsHeader(header_bytes, tensors, metadata, data_bytes, size)
    if data_bytes > available:
        raise _NotWhole(f"header says {data_bytes} bytes of data, file has {available}")
    return header


def read_header(path: Path) -> SafetensorsHeader:
    """The header of a whole safetensors file; raises `CheckpointError` saying what is wrong.

    Use `completeness` while a file may still be growing: this function treats every
    shortfall as corruption.
    """
    try:
        size = path.stat().st_size
        header = _parse_header(path, size)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file does not exist (deleted or pruned by the trainer?)") from None
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot be read: {exc}") from None
    except _NotWhole as exc:
        raise CheckpointError(f"{path}: not a whole safetensors file: {exc}") from None
    if header.expected_file_bytes != size:
        raise CheckpointError(
            f"{path}: header and data declare {header.expected_file_bytes} bytes, file has {size}: "
            "trailing bytes, or written by something else than safetensors"
        )
    return header


def completeness(path: Path) -> Completeness:
    """Whether `path` is a whole file now. Never raises for a short or half-written file.

    A safetensors file is whole when its header parses and 8 + header length + the
    largest data offset equals the file size. A pickle file cannot be checked that way;
    it counts as whole (the tracker still waits for it to settle) so that the daemon
    can record why it is refused.
    """
    try:
        stat = path.stat()
    except FileNotFoundError:
        return Completeness(False, "file is gone", -1, -1, exists=False)
    except OSError as exc:
        return Completeness(False, f"cannot stat: {exc}", -1, -1, exists=False)
    size, mtime_ns = stat.st_size, stat.st_mtime_ns
    if path.suffix.lower() in PICKLE_SUFFIXES:
        return Completeness(
            size > 0, "pickle file: only its size is checked" if size else "file is empty", size, mtime_ns
        )
    try:
        header = _parse_header(path, size)
    except _NotWhole as exc:
        return Completeness(False, str(exc), size, mtime_ns)
    except FileNotFoundError:
        return Completeness(False, "file is gone", -1, -1, exists=False)
    except OSError as exc:
        return Completeness(False, f"cannot read: {exc}", size, mtime_ns)
    expected = header.expected_file_bytes
    if expected != size:
        return Completeness(
            False, f"header and data declare {expected} bytes, file has {size}", size, mtime_ns
        )
    return Completeness(True, f"whole: {len(header.tensors)} tensors, {size} bytes", size, mtime_ns)


# --- step from metadata, content hash ---------------------------------------------------


def _int_or_none(value: object) -> int | None:
    try:
        number = int(str(value).strip())
    except (TypeError, ValueError):
        return None
    return number if number >= 0 else None


def progress_from_metadata(metadata: dict[str, str]) -> tuple[int | None, int | None]:
    """(step, epoch) as trainers write them into safetensors metadata, each None if absent.

    ai-toolkit: `training_info` (a JSON string) with `step` and `epoch`.
    kohya sd-scripts: `ss_steps` (global step at save) and `ss_epoch`.
    """
    step: int | None = None
    epoch: int | None = None
    info = metadata.get("training_info")
    if info:
        try:
            parsed = json.loads(info)
        except json.JSONDecodeError:
            parsed = None
        if isinstance(parsed, dict):
            step = _int_or_none(parsed.get("step"))
            epoch = _int_or_none(parsed.get("epoch"))
    if step is None and "ss_steps" in metadata:
        step = _int_or_none(metadata["ss_steps"])
    if epoch is None and "ss_epoch" in metadata:
        epoch = _int_or_none(metadata["ss_epoch"])
    return step, epoch


def step_from_metadata(path: Path) -> int | None:
    """The training step the trainer wrote into the header metadata, or None.

    Pickle files are never opened (None). A corrupt safetensors file raises `CheckpointError`.
    """
    if path.suffix.lower() in PICKLE_SUFFIXES:
        return None
    return progress_from_metadata(read_header(path).metadata)[0]


def resolve_step(checkpoint: Checkpoint) -> Checkpoint:
    """`checkpoint` with step and epoch filled from its metadata where the name had none."""
    if checkpoint.is_pickle or (checkpoint.step is not None and checkpoint.epoch is not None):
        return checkpoint
    step, epoch = progress_from_metadata(read_header(checkpoint.path).metadata)
    return replace(
        checkpoint,
        step=checkpoint.step if checkpoint.step is not None else step,
        epoch=checkpoint.epoch if checkpoint.epoch is not None else epoch,
    )


def content_hash(path: Path, *, chunk_bytes: int = HASH_CHUNK_BYTES) -> str:
    """SHA-256 of the file, streamed: the job store's identity of a checkpoint's content."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


# --- readiness ---------------------------------------------------------------------------

ReadyState = Literal["waiting", "ready", "abandoned", "vanished"]


@dataclass(frozen=True)
class ReadyEvent:
    """A final verdict on a tracked checkpoint; `poll` reports each one once."""

    checkpoint: Checkpoint
    state: ReadyState  # never "waiting"
    reason: str
    size: int
    mtime_ns: int


@dataclass
class _Tracked:
    checkpoint: Checkpoint
    signature: tuple[int, int] | None = None  # (size, mtime_ns) last seen
    unchanged_since: float = 0.0
    last: Completeness | None = None


class ReadinessTracker:
    """Decides when a checkpoint a trainer is writing in place is ready to read.

    Ready: the file is whole (`completeness`), its (size, mtime_ns) has not changed for
    `settle_seconds`, and its layout's marker file exists. Abandoned: unchanged for
    `abandon_seconds` but still not whole (truncated for good) or still without its
    marker. Vanished: gone before it was ready. Time is passed in, so tests need no sleeps.
    """

    def __init__(
        self, *, settle_seconds: float = SETTLE_SECONDS, abandon_seconds: float = ABANDON_SECONDS
    ) -> None:
        if settle_seconds < 0 or abandon_seconds <= settle_seconds:
            raise ValueError(
                f"`abandon_seconds` must exceed `settle_seconds` >= 0, got {abandon_seconds} and"
                f" {settle_seconds}"
            )
        self.settle_seconds = settle_seconds
        self.abandon_seconds = abandon_seconds
        self._tracked: dict[Path, _Tracked] = {}

    def __len__(self) -> int:
        return len(self._tracked)

    @property
    def paths(self) -> list[Path]:
        """Paths still waiting for a verdict."""
        return list(self._tracked)

    def observe(self, checkpoint: Checkpoint, now: float) -> ReadyState:
        """Start or continue tracking `checkpoint` (call on every file event) and say where it stands.

        The verdict itself is delivered by `poll`, once; this return value is informative.
        """
        tracked = self._tracked.get(checkpoint.path)
        if tracked is None:
            tracked = _Tracked(checkpoint, unchanged_since=now)
            self._tracked[checkpoint.path] = tracked
            logger.debug("tracking %s", checkpoint.path)
        return self._evaluate(tracked, now)[0]

    def forget(self, path: Path) -> None:
        """Stop tracking `path` without a verdict."""
        self._tracked.pop(path, None)

    def poll(self, now: float) -> list[ReadyEvent]:
        """Verdicts reached by `now`, each reported once; those paths are no longer tracked."""
        events: list[ReadyEvent] = []
        for path, tracked in list(self._tracked.items()):
            state, reason = self._evaluate(tracked, now)
            if state == "waiting":
                continue
            del self._tracked[path]
            last = tracked.last
            size, mtime_ns = (last.size, last.mtime_ns) if last is not None else (-1, -1)
            events.append(ReadyEvent(tracked.checkpoint, state, reason, size, mtime_ns))
            log = logger.info if state == "ready" else logger.warning
            log("%s %s: %s", path, state, reason)
        return events

    def _evaluate(self, tracked: _Tracked, now: float) -> tuple[ReadyState, str]:
        check = completeness(tracked.checkpoint.path)
        tracked.last = check
        if not check.exists:
            return "vanished", "vanished before it could be read (pruned or deleted by the trainer?)"
        signature = (check.size, check.mtime_ns)
        if signature != tracked.signature:
            tracked.signature = signature
            tracked.unchanged_since = now
        still_seconds = now - tracked.unchanged_since
        marker = tracked.checkpoint.marker
        if check.whole and (marker is None or marker.exists()):
            if still_seconds >= self.settle_seconds:
                return "ready", check.reason
            return "waiting", f"whole, settling ({still_seconds:.1f} of {self.settle_seconds} s)"
        if still_seconds >= self.abandon_seconds:
            if not check.whole:
                return "abandoned", f"truncated for good: {check.reason}; unchanged for {still_seconds:.0f} s"
            return "abandoned", f"{marker} never appeared; unchanged for {still_seconds:.0f} s"
        if not check.whole:
            return "waiting", f"not whole yet: {check.reason}"
        return "waiting", f"whole, waiting for {marker}"
