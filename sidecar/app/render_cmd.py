"""`sidecar render`: one checkpoint's samples (or the base model's, `--baseline`) to files, once."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from pathlib import Path

from sidecar.app.rendering import open_renderer, render_samples
from sidecar.app.state import running_daemon_pid
from sidecar.app.status import find_job_store
from sidecar.errors import CheckpointError, SidecarError
from sidecar.intake.layouts import recognise, run_dir_of
from sidecar.intake.steps import resolve_step
from sidecar.jobs.store import JobStore
from sidecar.plan.build import build_plan
from sidecar.plan.config import TrainerConfig, load_trainer_config
from sidecar.plan.request import SampleRequest
from sidecar.publish.files import sample_paths
from sidecar.publish.step import publish_step
from sidecar.settings import BASELINE_STEP, SamplesFolder, Settings, samples_dir

logger = logging.getLogger("sidecar.app")


def render_command(
    *,
    checkpoint: Path | None,
    config_path: Path,
    process: int | str | None = None,
    prompts_file: Path | None = None,
    step: int | None = None,
    baseline: bool = False,
    force: bool = False,
    overrides: dict[str, object] | None = None,
) -> int:
    """`sidecar render`; returns the exit code: 0 when every sample is on disk.

    Samples whose image is already on disk are kept (a killed render picks up where it
    stopped) unless `force` renders them all again. `overrides` are the command line's
    settings (`output`, `gpu`, `device`, `dtype`, `offload`).
    """
    config = load_trainer_config(config_path, process=process)
    settings = config.sidecar.merged(**(overrides or {}))
    plan = build_plan(config, prompts_file=prompts_file)
    if checkpoint is None and not baseline:
        if step is None:
            raise SidecarError(
                "`sidecar render` needs a CHECKPOINT, `--step N` of a checkpoint the daemon recorded, "
                "or `--baseline` for the base model alone"
            )
        folder = _samples_dir(config, settings, None)
        checkpoint = recorded_checkpoint(folder, step, plan.requests_for_step(step), force=force)
        if checkpoint is None:
            return 0  # queued for the running daemon
    if baseline:
        step = BASELINE_STEP
    elif step is None:
        step = checkpoint_step(checkpoint)  # type: ignore[arg-type]
    plan = dataclasses.replace(plan, requests=plan.requests_for_step(step))  # per-step seeds made concrete
    folder = _samples_dir(config, settings, checkpoint)
    requests = [
        request
        for request in plan.requests
        if force or not sample_paths(folder, step, request.index, plan.image_format).image.is_file()
    ]
    if not requests:
        logger.info(
            "step %s already has its %d sample(s) in %s; --force renders them again",
            step,
            len(plan.requests),
            folder,
        )
        return 0
    renderer = open_renderer(config, settings, plan)
    if not baseline:
        renderer.apply_lora(checkpoint)  # type: ignore[arg-type]
    started = time.perf_counter()
    rendered = render_samples(
        renderer,
        requests,
        samples_dir=folder,
        step=step,
        image_format=plan.image_format,
        batch_size=plan.batch_size,
    )
    publish_step(folder, step, plan.requests)
    logger.info(
        "rendered %d images in %.1f s into %s",
        len(rendered),
        time.perf_counter() - started,
        SamplesFolder(folder).step(step),
    )
    return 0 if len(rendered) == len(requests) else 1


def _samples_dir(config: TrainerConfig, settings: Settings, checkpoint: Path | None) -> Path:
    """`settings.samples_dir`'s rule, with the run folder the config names, else the checkpoint's."""
    run_dir = config.run_dir or (run_dir_of(checkpoint) if checkpoint is not None else None)
    if settings.output is None and run_dir is None:
        raise SidecarError(
            "the config names no `training_folder` to find the samples folder in; pass `--output SAMPLES_DIR`"
        )
    return samples_dir(settings.output, run_dir=run_dir or Path())


def recorded_checkpoint(
    samples_dir: Path, step: int, requests: Sequence[SampleRequest], *, force: bool
) -> Path | None:
    """The checkpoint file the daemon recorded at `step`, for `sidecar render --step N`.

    While a daemon serves the folder, `--force` hands the step back to it (its samples go
    back to pending with the current plan) and returns None: two renderers must not
    write the same files. Otherwise it is the recorded file, if the trainer has not
    pruned it.
    """
    with JobStore(find_job_store(samples_dir), now=time.time()) as store:
        pid = running_daemon_pid(samples_dir)
        if pid is not None:
            if not force:
                raise SidecarError(
                    f"a daemon (pid {pid}) serves {samples_dir}; `--force` queues step {step} for it"
                )
            store.force_render(step, now=time.time(), requests=requests)
            logger.info("step %s queued again for the running daemon (pid %s)", step, pid)
            return None
        jobs = [job for job in store.checkpoints() if job.step == step]
    if not jobs:
        raise CheckpointError(f"no checkpoint at step {step} is recorded in {samples_dir}")
    path = jobs[-1].path
    if not path.is_file():
        raise CheckpointError(f"step {step}: {path} is gone (pruned by the trainer?); nothing to render from")
    return path


def checkpoint_step(path: Path) -> int:
    """The training step of a checkpoint, from its name or its metadata."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    found = recognise(path, root=run_dir_of(path))
    if found is not None:
        found = resolve_step(found)
    if found is None or found.step is None:
        raise CheckpointError(
            f"{path}: cannot tell the training step from the file name or its metadata; pass `--step N`"
        )
    return found.step
