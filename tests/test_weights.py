"""sidecar/weights.py: the safetensors header, read without loading a tensor, and pickles refused."""

from __future__ import annotations

import json
import re
import struct
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from sidecar.errors import CheckpointError
from sidecar.weights import (
    MAX_HEADER_BYTES,
    PICKLE_SUFFIXES,
    HeaderError,
    SafetensorsHeader,
    is_pickle,
    parse_header,
    pickle_message,
    read_header,
    refuse_pickle,
    split_part,
    split_sibling,
)


def write_lora(path: Path, *, metadata: dict[str, str] | None = None, rows: int = 64) -> bytes:
    """A small real safetensors file; returns its bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {
        "lora_unet_down.lora_down.weight": np.ones((rows, 16), dtype=np.float32),
        "lora_unet_down.lora_up.weight": np.zeros((16, rows), dtype=np.float32),
        "lora_unet_down.alpha": np.array(8.0, dtype=np.float32),
    }
    save_file(tensors, str(path), metadata=metadata)
    return path.read_bytes()


def write_raw(path: Path, header: bytes, data: bytes = b"") -> Path:
    """A file with a hand-made header: length field, header bytes, data."""
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    return path


def parse(path: Path) -> SafetensorsHeader:
    return parse_header(path, path.stat().st_size)


# ------------------------------------------------------------------ whole files


def test_whole_file_header_is_read(tmp_path: Path) -> None:
    path = tmp_path / "a.safetensors"
    write_lora(path, metadata={"ss_steps": "100"})
    header = read_header(path)
    assert set(header.tensors) == {
        "lora_unet_down.lora_down.weight",
        "lora_unet_down.lora_up.weight",
        "lora_unet_down.alpha",
    }
    assert header.tensors["lora_unet_down.lora_down.weight"].shape == (64, 16)
    assert header.tensors["lora_unet_down.lora_down.weight"].dtype == "F32"
    assert header.metadata == {"ss_steps": "100"}
    assert header.expected_file_bytes == path.stat().st_size == header.file_bytes


def test_metadata_values_that_are_not_strings_are_kept_as_json(tmp_path: Path) -> None:
    header = json.dumps(
        {"__metadata__": {"n": 3, "s": "x"}, "w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}
    ).encode()
    path = write_raw(tmp_path / "a.safetensors", header, bytes(4))
    assert read_header(path).metadata == {"n": "3", "s": "x"}


# ------------------------------------------------------------------ refused, with the reason


def test_header_length_over_the_limit_is_refused_without_allocating_it(tmp_path: Path) -> None:
    path = tmp_path / "a.safetensors"
    path.write_bytes(struct.pack("<Q", 2**40) + b"{}")
    tracemalloc.start()
    try:
        with pytest.raises(HeaderError) as caught:
            parse(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1024 * 1024  # the declared 1 TiB was never asked for
    assert str(caught.value) == (
        f"header length field says {2**40} bytes, more than the {MAX_HEADER_BYTES} allowed: "
        "not a safetensors file, or corrupt"
    )
    with pytest.raises(CheckpointError) as caught_read:
        read_header(path)
    assert str(caught_read.value).startswith(
        f"{path}: not a whole safetensors file: header length field says {2**40} bytes"
    )


def test_a_complete_header_that_is_not_json_is_refused(tmp_path: Path) -> None:
    path = write_raw(tmp_path / "a.safetensors", b"this is not json at all")
    with pytest.raises(HeaderError, match=r"^header is not JSON \("):
        parse(path)
    with pytest.raises(CheckpointError) as caught:
        read_header(path)
    assert str(caught.value).startswith(f"{path}: not a whole safetensors file: header is not JSON (")
    write_raw(path, b"\xff\xfe{}")
    with pytest.raises(HeaderError, match="header is not JSON"):
        parse(path)


def test_a_json_header_that_is_not_an_object_is_refused(tmp_path: Path) -> None:
    path = write_raw(tmp_path / "a.safetensors", b"[1, 2]")
    with pytest.raises(HeaderError, match=re.escape("header is JSON but not an object (got list)")):
        parse(path)


@pytest.mark.parametrize(
    ("entries", "reason"),
    [
        ({"__metadata__": [1]}, "header `__metadata__` is not an object"),
        ({"w": {"dtype": "F32", "shape": [2]}}, "header entry 'w' lacks dtype/shape/data_offsets"),
        (
            {"w": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}},
            "tensor 'w' has offsets out of range: 8..0",
        ),
        ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 64]}}, "header says 64 bytes of data"),
    ],
)
def test_bad_header_entries_are_refused(tmp_path: Path, entries: dict, reason: str) -> None:
    path = write_raw(tmp_path / "a.safetensors", json.dumps(entries).encode(), bytes(8))
    with pytest.raises(HeaderError, match=re.escape(reason)):
        parse(path)
    with pytest.raises(CheckpointError, match=re.escape(reason)):
        read_header(path)


def test_truncated_file_says_by_how_much(tmp_path: Path) -> None:
    path = tmp_path / "a.safetensors"
    data = write_lora(path)
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(HeaderError, match=r"header says \d+ bytes of data, file has \d+"):
        parse(path)
    with pytest.raises(CheckpointError, match="not a whole safetensors file"):
        read_header(path)


def test_cut_inside_the_header(tmp_path: Path) -> None:
    path = tmp_path / "a.safetensors"
    data = write_lora(path)
    path.write_bytes(data[:20])
    with pytest.raises(HeaderError, match="header says it is"):
        parse(path)
    path.write_bytes(data[:5])
    with pytest.raises(HeaderError, match="fewer than the 8-byte header length"):
        parse(path)


def test_zero_byte_file(tmp_path: Path) -> None:
    path = tmp_path / "a.safetensors"
    path.write_bytes(b"")
    with pytest.raises(HeaderError, match=re.escape("file is empty (0 bytes)")):
        parse(path)
    with pytest.raises(CheckpointError, match="empty"):
        read_header(path)


def test_trailing_bytes_are_refused_by_read_header(tmp_path: Path) -> None:
    path = tmp_path / "a.safetensors"
    data = write_lora(path)
    path.write_bytes(data + b"\0" * 16)
    assert parse(path).expected_file_bytes == len(data)  # parses: the caller decides what that means
    with pytest.raises(CheckpointError, match=f"declare {len(data)} bytes, file has {len(data) + 16}"):
        read_header(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        read_header(tmp_path / "gone.safetensors")


# ------------------------------------------------------------------ pickles


@pytest.mark.parametrize("suffix", sorted(PICKLE_SUFFIXES))
def test_pickle_suffixes_are_recognised_whatever_the_case(suffix: str) -> None:
    assert is_pickle(Path(f"lora{suffix}")) and is_pickle(Path(f"lora{suffix.upper()}"))


def test_safetensors_is_no_pickle(tmp_path: Path) -> None:
    assert not is_pickle(tmp_path / "lora.safetensors")
    refuse_pickle(tmp_path / "lora.safetensors")  # returns: nothing to refuse


def test_refuse_pickle_names_the_file_and_never_opens_it(tmp_path: Path) -> None:
    path = tmp_path / "my_lora-step00000100.ckpt"  # does not even exist: it is never opened
    with pytest.raises(CheckpointError) as caught:
        refuse_pickle(path)
    message = str(caught.value)
    assert message == pickle_message(path)
    assert message.startswith(f"{path}: `.ckpt` files are pickles, which sidecar never loads")
    assert "save as .safetensors" in message


@pytest.mark.parametrize(
    ("name", "part", "sibling"),
    [
        (
            "a_000000500_high_noise.safetensors",
            ("a_000000500", "high_noise"),
            "a_000000500_low_noise.safetensors",
        ),
        (
            "a_000000500_low_noise.safetensors",
            ("a_000000500", "low_noise"),
            "a_000000500_high_noise.safetensors",
        ),
        ("a_high_noise.safetensors", ("a", "high_noise"), "a_low_noise.safetensors"),
        ("a_000000500.safetensors", None, None),
        ("_high_noise.safetensors", None, None),
        ("a_high_noise.pt", None, None),
        ("a_high_noise_000000500.safetensors", None, None),
    ],
)
def test_split_wan22_pairs_are_told_by_name(
    name: str, part: tuple[str, str] | None, sibling: str | None
) -> None:
    """ai-toolkit's two files of one Wan 2.2 checkpoint: each names the other (pure on the path)."""
    path = Path("/nowhere") / name
    assert split_part(path) == part
    assert split_sibling(path) == (path.with_name(sibling) if sibling else None)
