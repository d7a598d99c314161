"""sidecar/intake/layouts.py: which files are trainers' LoRA checkpoints, and at which step, by path alone.

Whether a recognised file is whole and settled is tests/intake/test_readiness.py; a `pattern`
without a `step` group is refused when settings are read (tests/test_settings.py).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from sidecar.intake.layouts import is_excluded_folder, recognise, run_dir_of

ROOT = Path("/runs/out")


# --- recognise --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("relative", "layout", "name", "step", "epoch", "is_final"),
    [
        ("my_lora_000000500.safetensors", "ai-toolkit", "my_lora", 500, None, False),
        ("my_lora/my_lora_000012000.safetensors", "ai-toolkit", "my_lora", 12000, None, False),
        ("my_lora.safetensors", "final", "my_lora", None, None, True),
        ("my_lora-step00001200.safetensors", "kohya", "my_lora", 1200, None, False),
        ("my_lora-000003.safetensors", "kohya", "my_lora", None, 3, False),
        (
            "save/mylora2024-05-01_12-30-45-save-1200-3-100.safetensors",
            "onetrainer",
            "mylora",
            1200,
            3,
            False,
        ),
        ("save/2024-05-01_12-30-45-save-40-0-40.safetensors", "onetrainer", "onetrainer", 40, 0, False),
        ("checkpoint-400/pytorch_lora_weights.safetensors", "diffusers", "checkpoint-400", 400, None, False),
        ("pytorch_lora_weights.safetensors", "diffusers", "pytorch_lora_weights", None, None, True),
        ("checkpoint-250/flux_lora.safetensors", "eridiffusion", "checkpoint-250", 250, None, False),
        ("sd35_lora_step750.safetensors", "eridiffusion", "sd35", 750, None, False),
        ("sdxl_lora_final.safetensors", "eridiffusion", "sdxl", None, None, True),
    ],
)
def test_recognises_each_trainers_layout(
    relative: str, layout: str, name: str, step: int | None, epoch: int | None, is_final: bool
) -> None:
    found = recognise(ROOT / relative, root=ROOT)
    assert found is not None
    assert (found.layout, found.name, found.step, found.epoch, found.is_final) == (
        layout,
        name,
        step,
        epoch,
        is_final,
    )
    assert not found.is_pickle


def test_eridiffusion_checkpoint_folder_needs_its_marker_and_names_its_arch() -> None:
    found = recognise(ROOT / "checkpoint-250/flux_lora.safetensors", root=ROOT)
    assert found is not None
    assert found.marker == ROOT / "checkpoint-250/training_state.json"
    assert found.arch == "flux"
    assert recognise(ROOT / "sd35_lora_step750.safetensors", root=ROOT).arch == "sd3"  # type: ignore[union-attr]
    # Other layouts write no marker.
    assert recognise(ROOT / "checkpoint-400/pytorch_lora_weights.safetensors", root=ROOT).marker is None  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("relative", "layout", "name", "step", "split"),
    [
        ("my_lora_000000500_high_noise.safetensors", "ai-toolkit", "my_lora", 500, "high_noise"),
        ("my_lora_000000500_low_noise.safetensors", "ai-toolkit", "my_lora", 500, "low_noise"),
        ("wan/my_wan_lora_000012000_low_noise.safetensors", "ai-toolkit", "my_wan_lora", 12000, "low_noise"),
        ("my_lora_high_noise.safetensors", "final", "my_lora", None, "high_noise"),
        ("my_lora_low_noise.safetensors", "final", "my_lora", None, "low_noise"),
        ("my_lora_000000500.safetensors", "ai-toolkit", "my_lora", 500, None),  # combined / one expert
        ("high_noise.safetensors", "final", "high_noise", None, None),  # no stem before the suffix
        (
            "my_lora_000000500_high_noise.pt",
            "final",
            "my_lora_000000500_high_noise",
            None,
            None,
        ),  # never ai-toolkit's
    ],
)
def test_ai_toolkits_split_wan22_files_carry_their_step_run_and_part(
    relative: str, layout: str, name: str, step: int | None, split: str | None
) -> None:
    """ai-toolkit's Wan 2.2 A14B pair (`{name}_{step:09d}_high_noise` / `_low_noise`, final
    `{name}_high_noise`): the step and run name come from the name without the suffix."""
    found = recognise(ROOT / relative, root=ROOT)
    assert found is not None
    assert (found.layout, found.name, found.step, found.split, found.is_final) == (
        layout,
        name,
        step,
        split,
        step is None,
    )


def test_a_user_pattern_keeps_the_split_part() -> None:
    pattern = re.compile(r"it(?P<step>\d+)")
    found = recognise(ROOT / "wan_it300_low_noise.safetensors", root=ROOT, pattern=pattern)
    assert found is not None
    assert (found.layout, found.name, found.step, found.split) == ("pattern", "wan_it300", 300, "low_noise")


@pytest.mark.parametrize(
    "relative",
    [
        "optimizer.safetensors",
        "optimizer.pt",
        "checkpoint-250/optimizer.safetensors",
        "checkpoint-250/training_state.json",
        "checkpoint-400/optimizer.bin",
        "checkpoint-400/model.safetensors",
        "checkpoint-400/random_states_0.pkl",
        "checkpoint-400/ema/pytorch_lora_weights.safetensors",
        "my_lora_ema.safetensors",
        "my_lora-ema_000000500.safetensors",
        "ema/my_lora_000000500.safetensors",
        "samples/1712345678__000000500_0.png",
        "samples/my_lora_000000500.safetensors",
        "my_lora_000000500.safetensors.tmp",
        "my_lora_000000500.safetensors.part",
        "my_lora_000000500.tmp.safetensors",
        ".my_lora_000000500.safetensors",
        "my_lora-step00000100-state/model.safetensors",
        "my_lora-state/model.safetensors",
        "backup/2024-05-01_12-30-45-backup-1200-3-100/lora.safetensors",
        ".sidecar/jobs.sqlite3",
        "config.yaml",
        "pytorch_model.bin",
        "my_lora.png",
    ],
)
def test_rejects_files_that_are_not_loras(relative: str) -> None:
    assert recognise(ROOT / relative, root=ROOT) is None


@pytest.mark.parametrize(
    ("relative", "layout", "step"),
    [
        ("my_lora-step00000100.ckpt", "kohya", 100),
        ("my_lora_000000500.pt", "ai-toolkit", 500),
        ("checkpoint-400/pytorch_lora_weights.bin", "diffusers", 400),
        ("my_lora.ckpt", "final", None),
    ],
)
def test_pickle_checkpoints_are_recognised_but_flagged(relative: str, layout: str, step: int | None) -> None:
    found = recognise(ROOT / relative, root=ROOT)
    assert found is not None
    assert found.is_pickle
    assert (found.layout, found.step) == (layout, step)
    assert "pickle" in found.pickle_message
    assert "safetensors" in found.pickle_message


def test_user_pattern_takes_precedence_and_reads_epoch() -> None:
    pattern = re.compile(r"run/ep(?P<epoch>\d+)_it(?P<step>\d+)\.safetensors$")
    found = recognise(ROOT / "run/ep2_it300.safetensors", root=ROOT, pattern=pattern)
    assert found is not None
    assert (found.layout, found.step, found.epoch) == ("pattern", 300, 2)

    # Precedence: the user's step wins over the built-in reading of the name.
    found = recognise(ROOT / "x_000000500.safetensors", root=ROOT, pattern=re.compile(r"x_0*(?P<step>\d)00"))
    assert found is not None
    assert (found.layout, found.step) == ("pattern", 5)

    # No match: the built-in layouts still apply.
    found = recognise(ROOT / "my_lora_000000500.safetensors", root=ROOT, pattern=pattern)
    assert found is not None
    assert (found.layout, found.step) == ("ai-toolkit", 500)


def test_path_outside_root_is_matched_on_its_name() -> None:
    found = recognise(Path("/elsewhere/my_lora_000000500.safetensors"), root=ROOT)
    assert found is not None
    assert found.step == 500


def test_recognise_reads_nothing_from_disk() -> None:
    """ROOT does not exist: recognition is pure on the path."""
    assert not ROOT.exists()
    found = recognise(ROOT / "checkpoint-250/flux_lora.safetensors", root=ROOT)
    assert found is not None and found.step == 250


@pytest.mark.parametrize(
    ("name", "excluded"),
    [
        ("samples", True),
        ("Samples", True),
        ("ema", True),
        ("logs", True),
        (".sidecar", True),
        ("my_lora-step00000100-state", True),
        ("run_state", True),
        ("checkpoint-500", False),
        ("save", False),
        ("my_lora", False),
    ],
)
def test_excluded_folders(name: str, excluded: bool) -> None:
    assert is_excluded_folder(name) is excluded


@pytest.mark.parametrize(
    ("relative", "run_dir"),
    [
        ("my_lora_000000500.safetensors", ""),
        ("my_lora.safetensors", ""),
        ("checkpoint-400/pytorch_lora_weights.safetensors", ""),
        ("checkpoint-250/flux_lora.safetensors", ""),
        ("save/mylora2024-05-01_12-30-45-save-1200-3-100.safetensors", ""),
        ("save/my_lora_000000500.safetensors", "save"),  # a folder named save, but no OneTrainer name
        ("nested/my_lora-step00001200.safetensors", "nested"),
    ],
)
def test_run_dir_of_a_checkpoint(relative: str, run_dir: str) -> None:
    """The folder the trainer writes the run into: above `checkpoint-N/` and OneTrainer's `save/`."""
    assert run_dir_of(ROOT / relative) == (ROOT / run_dir if run_dir else ROOT)
