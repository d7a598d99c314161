"""sidecar/intake/steps.py: a checkpoint's step from its metadata where its name has none."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from sidecar.errors import CheckpointError
from sidecar.intake.layouts import Checkpoint, recognise
from sidecar.intake.steps import (
    FIRST_STEP_WITHOUT_HISTORY,
    StepCounter,
    progress_from_metadata,
    resolve_step,
    step_from_metadata,
)
from sidecar.settings import BASELINE_STEP


def write_lora(path: Path, *, metadata: dict[str, str] | None = None) -> bytes:
    """A small real safetensors file; returns its bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {
        "lora_unet_down.lora_down.weight": np.ones((64, 16), dtype=np.float32),
        "lora_unet_down.lora_up.weight": np.zeros((16, 64), dtype=np.float32),
    }
    save_file(tensors, str(path), metadata=metadata)
    return path.read_bytes()


def recognised(path: Path) -> Checkpoint:
    found = recognise(path, root=path.parent)
    assert found is not None
    return found


def test_step_from_kohya_metadata(tmp_path: Path) -> None:
    path = tmp_path / "my_lora-000003.safetensors"
    write_lora(path, metadata={"ss_steps": "1200", "ss_epoch": "3", "ss_network_dim": "16"})
    assert step_from_metadata(path) == 1200
    found = recognised(path)
    assert found.step is None
    resolved = resolve_step(found)
    assert (resolved.step, resolved.epoch) == (1200, 3)


def test_step_from_ai_toolkit_training_info(tmp_path: Path) -> None:
    path = tmp_path / "my_lora.safetensors"
    info = {"step": 2000, "epoch": 4}
    write_lora(
        path, metadata={"training_info": json.dumps(info), "software": json.dumps({"name": "ai-toolkit"})}
    )
    assert step_from_metadata(path) == 2000
    resolved = resolve_step(recognised(path))
    assert (resolved.step, resolved.epoch, resolved.is_final) == (2000, 4, True)


def test_step_from_metadata_absent(tmp_path: Path) -> None:
    path = tmp_path / "my_lora.safetensors"
    write_lora(path)
    assert step_from_metadata(path) is None
    resolved = resolve_step(recognised(path))
    assert (resolved.step, resolved.epoch) == (None, None)


@pytest.mark.parametrize(
    ("metadata", "expected"),
    [
        ({"training_info": "not json", "ss_steps": "x"}, (None, None)),
        ({"training_info": "[1, 2]", "ss_steps": "300", "ss_epoch": "2"}, (300, 2)),
        ({"training_info": json.dumps({"step": 10}), "ss_steps": "20", "ss_epoch": "1"}, (10, 1)),
        ({"ss_steps": "-5", "ss_epoch": " 7 "}, (None, 7)),
        ({}, (None, None)),
    ],
)
def test_progress_from_metadata(metadata: dict[str, str], expected: tuple[int | None, int | None]) -> None:
    """ai-toolkit's `training_info` first, kohya's `ss_steps` / `ss_epoch` for what it lacks."""
    assert progress_from_metadata(metadata) == expected


def test_a_step_in_the_name_is_kept_and_only_the_epoch_is_read(tmp_path: Path) -> None:
    path = tmp_path / "my_lora_000000500.safetensors"
    write_lora(path, metadata={"ss_steps": "999", "ss_epoch": "2"})
    resolved = resolve_step(recognised(path))
    assert (resolved.step, resolved.epoch) == (500, 2)
    both = replace(recognised(path), epoch=1)
    assert resolve_step(both) is both  # nothing to read


def test_pickle_files_are_never_opened(tmp_path: Path) -> None:
    path = tmp_path / "a-step00000100.ckpt"
    path.write_bytes(b"\x80\x04not really a pickle")
    assert step_from_metadata(path) is None
    final = tmp_path / "my_lora.ckpt"
    final.write_bytes(b"\x80\x04pickle")
    checkpoint = recognised(final)
    assert checkpoint.is_pickle and resolve_step(checkpoint) is checkpoint


def test_a_corrupt_file_raises_checkpoint_error(tmp_path: Path) -> None:
    path = tmp_path / "my_lora.safetensors"
    path.write_bytes(b"\x01\x02")
    with pytest.raises(CheckpointError, match="not a whole safetensors file"):
        step_from_metadata(path)
    with pytest.raises(CheckpointError, match="not a whole safetensors file"):
        resolve_step(recognised(path))


def test_step_counter_gives_one_past_the_highest_step_seen() -> None:
    counter = StepCounter()
    assert FIRST_STEP_WITHOUT_HISTORY == BASELINE_STEP + 1 == 1  # step 0 is the base model alone
    assert counter.next_unknown() == FIRST_STEP_WITHOUT_HISTORY
    for step in (500, None, 300):
        counter.note(step)
    assert counter.highest == 500
    assert counter.next_unknown() == 501
