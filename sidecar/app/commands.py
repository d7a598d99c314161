"""The short commands: `check`, `status`, `grid`, `gallery`, `tiny`. Each returns what it prints."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from sidecar.settings import samples_dir


def trainer_config(
    config: Path | None, *, run_dir: Path | None = None, checkpoint: Path | None = None
) -> Path:
    """The config to read: `config` when it is a file; when it is a folder (a run's output
    folder), or not given, the config the run's trainer keeps or copies in the run folder
    (`run_dir`, else the checkpoint's; `sidecar.plan.discover`). Raises `ConfigError` naming
    where it looked."""
    from sidecar.errors import ConfigError
    from sidecar.intake.layouts import run_dir_of
    from sidecar.plan.discover import find_config

    if config is not None and not Path(config).is_dir():
        return Path(config)
    if run_dir is None and checkpoint is not None:
        run_dir = run_dir_of(Path(checkpoint).resolve())
    folder = Path(config) if config is not None else run_dir
    if folder is None:
        raise ConfigError("no trainer config given: pass --config CONFIG (or a checkpoint in its run folder)")
    return find_config(folder)


def check(
    config_path: Path,
    *,
    process: int | str | None,
    prompts_file: Path | None,
    gpu: int | None = None,
    vram: str | None = None,
) -> str:
    """`sidecar check CONFIG [--gpu N | --vram SIZE]`: the resolved sample plan, then the memory
    plan (`sidecar.render.memory_plan`) and the mode `--offload auto` takes on that card."""
    from sidecar.errors import ModelError
    from sidecar.plan.build import build_plan
    from sidecar.plan.config import load_trainer_config
    from sidecar.plan.report import format_plan
    from sidecar.render.memory_plan import check_report

    config = load_trainer_config(trainer_config(config_path, run_dir=None), process=process)
    plan = build_plan(config, prompts_file=prompts_file)
    try:
        memory = check_report(
            config.model_source(),
            dtype=config.sidecar.dtype,
            pixels=plan.largest_pixels,
            batch_size=plan.batch_size,
            lora_rank=config.lora_rank,
            gpu=gpu,
            vram=vram,
        )
    except ModelError as error:
        if gpu is not None or vram is not None:
            raise error.located(config.where(f"model.{error.key}")) from error
        memory = f"memory plan: not made ({error})"
    return format_plan(config, plan) + "\n\n" + memory


def status(output_dir: Path, *, output: Path | None) -> str:
    """`sidecar status OUTPUT_DIR`: the report of the samples folder the daemon serves."""
    from sidecar.app.status import status_report

    return status_report(samples_dir(output, run_dir=output_dir))


def grid(
    folder: Path,
    *,
    steps: Sequence[int] | None,
    prompts: Sequence[int] | None,
    output: Path,
    thumb_size: int | None,
    frames: Sequence[str | int] = ("middle",),
) -> str:
    """`sidecar grid SAMPLES_DIR`: chosen steps x prompts in one image (video samples: `frames`)."""
    from sidecar.publish.grids import compare_grid

    return str(
        compare_grid(
            folder, steps=steps, prompts=prompts, output=output, thumb_size=thumb_size, frames=frames
        )  # type: ignore[arg-type]
    )


def gallery(folder: Path) -> str:
    """`sidecar gallery SAMPLES_DIR`: rebuild `index.html`."""
    from sidecar.publish.gallery import build_gallery

    return str(build_gallery(folder))


def tiny(folder: Path, *, size: str) -> str:
    """`sidecar tiny DIR`: the tiny offline models, as diffusers folders."""
    from sidecar.testing.tiny import tiny_models

    return "\n".join(f"{arch}: {path}" for arch, path in tiny_models(folder, size=size).items())  # type: ignore[arg-type]
