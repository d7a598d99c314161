"""What a Ray worker receives of a checkpoint: the file, and a split Wan 2.2 pair's sibling with it."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("ray")

from sidecar.app.pool import lora_files, write_lora_files
from sidecar.render.wan_experts import HIGH_NOISE, LOW_NOISE, expert_files


def test_a_split_pair_travels_whole_and_the_worker_finds_both_experts(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    high = cache / "wan_000000250_high_noise.safetensors"
    low = cache / "wan_000000250_low_noise.safetensors"
    high.write_bytes(b"high-noise bytes")
    low.write_bytes(b"low-noise bytes")

    files = lora_files(high)
    worker = tmp_path / "worker" / "checkpoint"
    write_lora_files(worker, files)

    assert files == {high.name: b"high-noise bytes", low.name: b"low-noise bytes"}
    assert expert_files(worker / high.name) == {HIGH_NOISE: worker / high.name, LOW_NOISE: worker / low.name}
    assert sorted(path.name for path in worker.iterdir()) == sorted(files)  # no `.partial` left


@pytest.mark.parametrize("name", ["my_lora_000000100.safetensors", "wan_000000250_high_noise.safetensors"])
def test_a_lone_file_travels_alone(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_bytes(b"weights")

    assert lora_files(path) == {name: b"weights"}
