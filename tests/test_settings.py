"""sidecar/settings.py: one Settings model (the `sidecar:` section, then the CLI) and the samples folder."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from sidecar.errors import ConfigError
from sidecar.intake.layouts import run_dir_of
from sidecar.plan.config import load_trainer_config
from sidecar.settings import (
    ABANDON_SECONDS,
    BASELINE_STEP,
    POLL_INTERVAL_SECONDS,
    SETTLE_SECONDS,
    STEP_DIR_PATTERN,
    SamplesFolder,
    Settings,
    samples_dir,
)

FLAT_BODY = "model: {name_or_path: m, arch: sdxl}\nsample: {prompts: [a]}\n"


def write_flat(tmp_path: Path, sidecar_section: str) -> Path:
    """A flat config whose first line is `sidecar: <sidecar_section>`."""
    path = tmp_path / "train.yaml"
    path.write_text(f"sidecar: {sidecar_section}\n{FLAT_BODY}")
    return path


# ------------------------------------------------------------------ defaults


def test_defaults() -> None:
    settings = Settings()
    assert (settings.dtype, settings.offload, settings.backlog, settings.log_format) == (
        "auto",
        "none",
        "all",
        "plain",
    )
    assert (settings.device, settings.gpu, settings.share_gpu, settings.output, settings.pattern) == (
        None,
        None,
        None,
        None,
        None,
    )
    assert (settings.settle_seconds, settings.abandon_seconds, settings.poll_interval_seconds) == (
        SETTLE_SECONDS,
        ABANDON_SECONDS,
        POLL_INTERVAL_SECONDS,
    )
    assert settings.slot_file_mode == "exists" and settings.polling is False
    assert settings.compiled_pattern is None and settings.render_gpu is None


def test_dtype_aliases_and_choices_are_case_insensitive() -> None:
    assert Settings(dtype="bfloat16").dtype == "bf16"
    assert Settings(dtype="Half").dtype == "fp16"
    assert Settings(offload="AUTO").offload == "auto"
    with pytest.raises(ValidationError, match="must be one of auto, bf16, fp16, fp32, got 'fp8'"):
        Settings(dtype="fp8")


# ------------------------------------------------------------------ the `sidecar:` section


def test_sidecar_section_in_process_overrides_top_level(tmp_path: Path) -> None:
    path = tmp_path / "train.yaml"
    path.write_text(
        "sidecar: {gpu: 1, dtype: fp16, backlog: latest}\n"
        "job: extension\n"
        "config:\n"
        "  name: n\n"
        "  process:\n"
        "    - model: {name_or_path: m, arch: sdxl}\n"
        "      sidecar: {gpu: 2, tensorboard: tb}\n"
        "      sample: {prompts: [a]}\n"
    )
    settings = load_trainer_config(path).sidecar
    assert (settings.gpu, settings.dtype, settings.backlog) == (2, "fp16", "latest")
    assert settings.tensorboard == tmp_path.resolve() / "tb"


def test_relative_paths_in_the_section_are_from_the_config_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir("/")
    path = write_flat(tmp_path, "{output: rendered, slot_file: slot, tensorboard: /abs/tb}")
    settings = load_trainer_config(path).sidecar
    assert settings.output == tmp_path.resolve() / "rendered"
    assert settings.slot_file == tmp_path.resolve() / "slot"
    assert settings.tensorboard == Path("/abs/tb")


# ------------------------------------------------------------------ the command line on top


def test_cli_overrides_win_over_the_config_section(tmp_path: Path) -> None:
    path = write_flat(tmp_path, "{gpu: 1, dtype: bf16, offload: model, backlog: latest}")
    from_config = load_trainer_config(path).sidecar
    merged = from_config.merged(gpu=3, dtype=None, offload="sequential", output=Path("out"), pattern=None)
    assert (merged.gpu, merged.dtype, merged.offload, merged.backlog, merged.output) == (
        3,
        "bf16",  # None means "not given": the config's value stays
        "sequential",
        "latest",
        Path("out"),
    )
    assert from_config.merged() is from_config
    assert from_config.merged(gpu=None, output=None) is from_config


def test_a_bad_override_names_its_flag() -> None:
    base = Settings(gpu=1, dtype="bf16", offload="model")
    with pytest.raises(ConfigError) as caught:
        base.merged(share_gpu="lots")
    assert str(caught.value) == "`--share-gpu` must be a non-negative integer, got 'lots'"
    with pytest.raises(ConfigError) as caught:
        base.merged(slot_file_mode="sometimes")
    assert str(caught.value) == "`--slot-file-mode` must be one of exists, absent, lock, got 'sometimes'"
    with pytest.raises(TypeError, match="colour"):
        base.merged(colour="red")


def test_user_pattern_without_step_group_is_a_config_error(tmp_path: Path) -> None:
    """Checked when settings are read (config or CLI), not when a file is recognised."""
    path = write_flat(tmp_path, r"{pattern: 'a_(\d+)'}")
    with pytest.raises(ConfigError) as caught:
        load_trainer_config(path)
    assert str(caught.value).startswith(
        f"{path}:1 sidecar.pattern: must have a named group `step`, e.g. '_(?P<step>\\d+)\\.safetensors$'"
    )
    with pytest.raises(ConfigError, match=re.escape("`--pattern` must have a named group `step`")):
        Settings().merged(pattern=r"a_(\d+)")
    with pytest.raises(ConfigError, match=re.escape("`--pattern` must be a valid regular expression")):
        Settings().merged(pattern=r"a_(?P<step>\d+")
    with pytest.raises(ValidationError, match="must have a named group `step`"):
        Settings(pattern=r"a_(\d+)")


def test_a_pattern_with_a_step_group_is_compiled() -> None:
    settings = Settings().merged(pattern=r"run-(?P<step>\d+)\.safetensors$")
    compiled = settings.compiled_pattern
    assert compiled is not None
    found = compiled.search("run-0300.safetensors")
    assert found is not None and found.group("step") == "0300"


# ------------------------------------------------------------------ settings that conflict


def test_abandon_must_exceed_settle() -> None:
    with pytest.raises(ValidationError, match=re.escape("`abandon_seconds` must exceed `settle_seconds`")):
        Settings(settle_seconds=5, abandon_seconds=5)
    with pytest.raises(ConfigError) as caught:
        Settings().merged(abandon_seconds=0.5)
    assert str(caught.value) == (
        "the command line and the config's `sidecar:` section together: "
        "`abandon_seconds` must exceed `settle_seconds` (1), got 0.5"
    )
    assert Settings(settle_seconds=0, abandon_seconds=0.5).abandon_seconds == 0.5


def test_abandon_not_above_settle_in_the_config_is_located(tmp_path: Path) -> None:
    path = write_flat(tmp_path, "{settle_seconds: 5, abandon_seconds: 2}")
    with pytest.raises(ConfigError) as caught:
        load_trainer_config(path)
    assert str(caught.value) == (
        f"{path}:1 sidecar: `abandon_seconds` must exceed `settle_seconds` (5), got 2"
    )


def test_poll_interval_must_be_positive() -> None:
    with pytest.raises(ConfigError, match=re.escape("`poll_interval_seconds` must be > 0, got 0")):
        Settings().merged(poll_interval_seconds=0)


def test_gpu_and_share_gpu_naming_different_cards_is_refused() -> None:
    with pytest.raises(ValidationError, match=re.escape("`gpu` 0 and `share_gpu` 1 name different cards")):
        Settings(gpu=0, share_gpu=1)
    with pytest.raises(ConfigError) as caught:
        Settings(gpu=0).merged(share_gpu=1)
    assert str(caught.value) == (
        "the command line and the config's `sidecar:` section together: "
        "`gpu` 0 and `share_gpu` 1 name different cards"
    )
    same = Settings(gpu=1, share_gpu=1)
    assert same.render_gpu == 1
    assert Settings(share_gpu=2).render_gpu == 2  # the shared card is the card to render on
    assert Settings(gpu=3).render_gpu == 3


def test_settings_conflicting_across_sections_are_located_at_the_later_one(tmp_path: Path) -> None:
    path = tmp_path / "train.yaml"
    path.write_text(
        "sidecar: {gpu: 0}\n"
        "job: extension\n"
        "config:\n"
        "  name: n\n"
        "  process:\n"
        "    - model: {name_or_path: m, arch: sdxl}\n"
        "      sidecar: {share_gpu: 1}\n"
        "      sample: {prompts: [a]}\n"
    )
    with pytest.raises(ConfigError) as caught:
        load_trainer_config(path)
    assert str(caught.value) == (
        f"{path}:7 config.process[0].sidecar: `gpu` 0 and `share_gpu` 1 name different cards"
    )


# ------------------------------------------------------------------ the samples folder


def test_samples_dir_is_output_when_given_else_samples_in_the_run_folder() -> None:
    """README: `--output` or `sidecar.output`, else `samples/` in the run folder: OUTPUT_DIR for
    `watch`; for `render` `<training_folder>/<name>`, else the checkpoint's run folder (the folder
    above `checkpoint-N/` or OneTrainer's `save/`)."""
    assert samples_dir(Path("/elsewhere/rendered"), run_dir=Path("/runs/my_lora")) == Path(
        "/elsewhere/rendered"
    )
    assert samples_dir(None, run_dir=Path("output/my_lora")) == Path("output/my_lora/samples")
    flat = Path("/runs/x/my_lora_000000500.safetensors")
    assert samples_dir(None, run_dir=run_dir_of(flat)) == Path("/runs/x/samples")
    in_folder = Path("/runs/x/checkpoint-500/pytorch_lora_weights.safetensors")
    assert samples_dir(None, run_dir=run_dir_of(in_folder)) == Path("/runs/x/samples")
    onetrainer = Path("/runs/x/save/lora2024-05-01_12-30-45-save-1200-3-100.safetensors")
    assert samples_dir(None, run_dir=run_dir_of(onetrainer)) == Path("/runs/x/samples")


def test_samples_folder_layout() -> None:
    folder = SamplesFolder(Path("/runs/x/samples"))
    assert folder.step(500) == Path("/runs/x/samples/step_000500")
    assert folder.step(BASELINE_STEP) == Path("/runs/x/samples/step_000000")
    assert folder.step(1_234_567).name == "step_1234567"
    assert STEP_DIR_PATTERN.match(folder.step(500).name) and STEP_DIR_PATTERN.match("step_1234567")
    assert not STEP_DIR_PATTERN.match("step_500")
    assert folder.state == Path("/runs/x/samples/.sidecar")
    assert folder.jobs == Path("/runs/x/samples/.sidecar/jobs.sqlite3")
    assert folder.cache == Path("/runs/x/samples/.sidecar/cache")
    assert folder.state_file == Path("/runs/x/samples/.sidecar/daemon.json")
    assert folder.lock == Path("/runs/x/samples/.sidecar/daemon.lock")


@pytest.mark.parametrize("step", [-1, True, 1.5, "500"])
def test_samples_folder_step_must_be_a_non_negative_integer(step: object) -> None:
    with pytest.raises(ValueError, match="`step` must be a non-negative integer"):
        SamplesFolder(Path("/s")).step(step)  # type: ignore[arg-type]


def test_naming_the_folder_creates_nothing(tmp_path: Path) -> None:
    folder = SamplesFolder(tmp_path / "samples")
    assert folder.jobs.name == "jobs.sqlite3" and folder.step(1).name == "step_000001"
    assert not (tmp_path / "samples").exists()
