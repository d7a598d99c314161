"""A checkpoint's training step where its name has none: from its metadata, else by rule.

A final file (`{name}.safetensors`) or a kohya epoch file carries no step in its name.
Trainers write it into the safetensors metadata: ai-toolkit a `training_info` JSON with
`step` and `epoch`, kohya sd-scripts `ss_steps` and `ss_epoch`. Where neither is there,
the step is one past the highest step seen so far, and 1 when none is known (step 0 is
the baseline, the base model alone): `StepCounter.next_unknown`.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from sidecar.intake.layouts import Checkpoint
from sidecar.settings import BASELINE_STEP
from sidecar.weights import is_pickle, read_header

FIRST_STEP_WITHOUT_HISTORY = BASELINE_STEP + 1


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
    if is_pickle(path):
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


class StepCounter:
    """The highest step seen, for the step of a checkpoint that has none anywhere."""

    def __init__(self) -> None:
        self.highest: int | None = None

    def note(self, step: int | None) -> None:
        if step is not None and (self.highest is None or step > self.highest):
            self.highest = step

    def next_unknown(self) -> int:
        """One past the highest step seen; `FIRST_STEP_WITHOUT_HISTORY` when none was."""
        return FIRST_STEP_WITHOUT_HISTORY if self.highest is None else self.highest + 1
