"""What a weights file is, read without loading a tensor: the safetensors header, and pickles.

Shared by every stage that meets a weights file: intake (is a checkpoint whole?),
the plan (which architecture is this single-file base model?) and render (refuse a
pickle before diffusers sees it, sizes for the memory plan). Nothing here imports torch.

A safetensors file is 8 bytes of little-endian header length, a JSON header naming each
tensor's dtype, shape and data offsets, then the data. Pickle checkpoints (`.ckpt`,
`.pt`, `.pth`, `.bin`, `.pkl`) are never opened: unpickling can run arbitrary code.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from sidecar.errors import CheckpointError

SAFETENSORS_SUFFIX = ".safetensors"
PICKLE_SUFFIXES = frozenset({".ckpt", ".pt", ".pth", ".bin", ".pkl"})
HEADER_LENGTH_BYTES = 8  # little-endian u64 in front of the JSON header
MAX_HEADER_BYTES = 100 * 1024 * 1024  # a larger declared header is corrupt, never allocated

# ai-toolkit's Wan 2.2 A14B LoRA, by default: one file per expert, `{stem}_high_noise.safetensors`
# then `{stem}_low_noise.safetensors` (`wan22_14b_model.py`, `save_lora`); intake pairs them, render
# puts each into its expert.
SplitPart = Literal["high_noise", "low_noise"]
SPLIT_PARTS: tuple[SplitPart, SplitPart] = ("high_noise", "low_noise")  # high first, as written


def is_pickle(path: Path) -> bool:
    """Whether `path` names a pickle checkpoint (by suffix; the file is never opened)."""
    return Path(path).suffix.lower() in PICKLE_SUFFIXES


def pickle_message(path: Path) -> str:
    """Why a pickle file is refused, and what to do instead."""
    return (
        f"{path}: `{Path(path).suffix}` files are pickles, which sidecar never loads "
        "(unpickling can run arbitrary code); save as .safetensors (kohya: "
        "`--save_model_as safetensors`; diffusers scripts: `safe_serialization=True`)"
    )


def split_part(path: Path) -> tuple[str, SplitPart] | None:
    """(stem without the suffix, part) of one file of a split Wan 2.2 pair; None for any other file."""
    path = Path(path)
    if path.suffix.lower() != SAFETENSORS_SUFFIX:
        return None
    for part in SPLIT_PARTS:
        base = path.stem.removesuffix(f"_{part}")
        if base != path.stem and base:
            return base, part
    return None


def split_sibling(path: Path) -> Path | None:
    """The other file of the split pair `path` belongs to (there or not); None for any other file."""
    found = split_part(path)
    if found is None:
        return None
    base, part = found
    other = SPLIT_PARTS[1 - SPLIT_PARTS.index(part)]
    return Path(path).with_name(f"{base}_{other}{Path(path).suffix}")


def refuse_pickle(path: Path) -> None:
    """Pickle checkpoints can run code when loaded; sidecar never `torch.load`s one."""
    if is_pickle(path):
        raise CheckpointError(pickle_message(path))


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


class HeaderError(Exception):
    """The header cannot be parsed (yet); the message says why. A file still being written
    raises it too, so callers decide whether that is corruption (`read_header`) or not yet."""


def parse_header(path: Path, size: int) -> SafetensorsHeader:
    """Parse the header of `path` (`size` bytes); raises `HeaderError` with the reason."""
    if size == 0:
        raise HeaderError("file is empty (0 bytes)")
    if size < HEADER_LENGTH_BYTES:
        raise HeaderError(f"file has {size} bytes, fewer than the 8-byte header length")
    with path.open("rb") as handle:
        (header_bytes,) = struct.unpack("<Q", handle.read(HEADER_LENGTH_BYTES))
        if header_bytes > MAX_HEADER_BYTES:
            raise HeaderError(
                f"header length field says {header_bytes} bytes, more than the "
                f"{MAX_HEADER_BYTES} allowed: not a safetensors file, or corrupt"
            )
        if HEADER_LENGTH_BYTES + header_bytes > size:
            raise HeaderError(
                f"header says it is {header_bytes} bytes, file has only {size - HEADER_LENGTH_BYTES} after "
                "the length field"
            )
        raw = handle.read(header_bytes)
    try:
        parsed = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise HeaderError(f"header is not JSON ({exc})") from None
    if not isinstance(parsed, dict):
        raise HeaderError(f"header is JSON but not an object (got {type(parsed).__name__})")

    available = size - HEADER_LENGTH_BYTES - header_bytes
    metadata: dict[str, str] = {}
    tensors: dict[str, TensorInfo] = {}
    data_bytes = 0
    for key, value in parsed.items():
        if key == "__metadata__":
            if not isinstance(value, dict):
                raise HeaderError("header `__metadata__` is not an object")
            metadata = {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in value.items()}
            continue
        try:
            begin, end = (int(x) for x in value["data_offsets"])
            info = TensorInfo(str(value["dtype"]), tuple(int(x) for x in value["shape"]), (begin, end))
        except (KeyError, TypeError, ValueError):
            raise HeaderError(f"header entry {key!r} lacks dtype/shape/data_offsets") from None
        if not 0 <= begin <= end:
            raise HeaderError(f"tensor {key!r} has offsets out of range: {begin}..{end}")
        tensors[key] = info
        data_bytes = max(data_bytes, end)
    header = SafetensorsHeader(header_bytes, tensors, metadata, data_bytes, size)
    if data_bytes > available:
        raise HeaderError(f"header says {data_bytes} bytes of data, file has {available}")
    return header


def read_header(path: Path) -> SafetensorsHeader:
    """The header of a whole safetensors file; raises `CheckpointError` saying what is wrong.

    Use `sidecar.intake.readiness.completeness` while a file may still be growing: this function treats every
    shortfall as corruption.
    """
    try:
        size = path.stat().st_size
        header = parse_header(path, size)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file does not exist (deleted or pruned by the trainer?)") from None
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot be read: {exc}") from None
    except HeaderError as exc:
        raise CheckpointError(f"{path}: not a whole safetensors file: {exc}") from None
    if header.expected_file_bytes != size:
        raise CheckpointError(
            f"{path}: header and data declare {header.expected_file_bytes} bytes, file has {size}: "
            "trailing bytes, or written by something else than safetensors"
        )
    return header
