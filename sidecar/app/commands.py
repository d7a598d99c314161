"""The short commands: `check`, `status`, `grid`, `gallery`, `tiny`. Each returns what it prints."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from sidecar.settings import samples_dir


def check(config_path: Path, *, process: int | str | None, prompts_file: Path | None) -> str:
    """`sidecar check CONFIG`: the resolved sample plan, or a located `ConfigError`."""
    from sidecar.plan.build import build_plan
    from sidecar.plan.config import load_trainer_config
    from sidecar.plan.report import format_plan

    config = load_trainer_config(config_path, process=process)
    return format_plan(config, build_plan(config, prompts_file=prompts_file))


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
) -> str:
    """`sidecar grid SAMPLES_DIR`: chosen steps x prompts in one image."""
    from sidecar.publish.grids import compare_grid

    return str(compare_grid(folder, steps=steps, prompts=prompts, output=output, thumb_size=thumb_size))


def gallery(folder: Path) -> str:
    """`sidecar gallery SAMPLES_DIR`: rebuild `index.html`."""
    from sidecar.publish.gallery import build_gallery

    return str(build_gallery(folder))


def tiny(folder: Path, *, size: str) -> str:
    """`sidecar tiny DIR`: the tiny offline models, as diffusers folders."""
    from sidecar.testing.tiny import tiny_models

    return "\n".join(f"{arch}: {path}" for arch, path in tiny_models(folder, size=size).items())  # type: ignore[arg-type]
