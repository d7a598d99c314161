"""Render one checkpoint's sample plan to files: the core `sidecar render` and the daemon share.

A renderer holds the base model; this module applies one checkpoint's LoRA to it,
renders the requests and writes each image atomically as soon as it exists, so a
stop between two images loses nothing that was already rendered.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from sidecar.checkpoints import recognise, resolve_step
from sidecar.config import SidecarSettings, TrainerConfig, load_trainer_config
from sidecar.devices import (
    MemoryPolicy,
    Placement,
    apply_memory_mode,
    is_cuda_oom,
    resolve_device,
    resolve_dtype,
)
from sidecar.errors import CheckpointError, ModelError, SidecarError, TransientError
from sidecar.jobs import JobStore
from sidecar.output import SamplePaths, sample_paths, write_sample
from sidecar.pipelines import Renderer, renderer_class
from sidecar.prompts import SampleRequest, build_plan
from sidecar.publish import publish_step
from sidecar.status import find_job_store, running_daemon_pid

logger = logging.getLogger("sidecar.render")


@dataclass(frozen=True)
class RenderedSample:
    """One sample on disk."""

    request: SampleRequest
    paths: SamplePaths
    seconds: float  # wall time since the previous image (a batch's time falls on its first image)


def load_renderer(config: TrainerConfig, settings: SidecarSettings | None = None) -> Renderer:
    """The base model the trainer config names, loaded once and placed on its device.

    `settings` (device, gpu, dtype, offload) default to the config's `sidecar:` section.
    """
    settings = settings or config.sidecar
    device = resolve_device(device=settings.device, gpu=settings.gpu)
    dtype = resolve_dtype(settings.dtype, device)
    try:
        renderer = _load_base(config, dtype)
    except ModelError as error:
        raise error.located(config.where(f"model.{error.key}")) from error
    mode = apply_memory_mode(renderer.pipe, settings.offload, device)
    renderer.placement = Placement(device=device, policy=MemoryPolicy(mode))
    logger.info(
        "loaded %s base %s on %s (%s, offload=%s)",
        renderer.spec.label,
        config.model.name_or_path,
        device,
        str(dtype).removeprefix("torch."),
        mode,
    )
    return renderer


def _load_base(config: TrainerConfig, dtype: torch.dtype) -> Renderer:
    return renderer_class(config.arch).from_model(
        str(config.model.name_or_path),
        vae_path=config.model.vae_path,
        text_encoder_paths={
            "clip_l_path": config.model.clip_l_path,
            "clip_g_path": config.model.clip_g_path,
            "t5_path": config.model.t5_path,
        },
        dtype=dtype,
    )


def render_samples(
    renderer: Renderer,
    requests: Sequence[SampleRequest],
    *,
    samples_dir: Path,
    step: int,
    image_format: str = "png",
    batch_size: int = 1,
    should_stop: Callable[[], bool] = lambda: False,
    on_sample: Callable[[RenderedSample], None] = lambda sample: None,
) -> list[RenderedSample]:
    """Render `requests` with the renderer's current LoRA and write each image.

    `should_stop` is asked after every image; when it says so, the images written
    so far are kept and the rest are left for later (the job store knows which).
    A CUDA out-of-memory error re-places the pipeline in the next stronger memory
    mode (kept for later checkpoints) and renders what is left; with no stronger mode
    left it is a `TransientError`.
    """
    rendered: list[RenderedSample] = []
    remaining = list(requests)
    while remaining:
        try:
            for sample in _render_and_write(
                renderer,
                remaining,
                samples_dir=samples_dir,
                step=step,
                image_format=image_format,
                batch_size=batch_size,
            ):
                rendered.append(sample)
                remaining.remove(sample.request)
                on_sample(sample)
                if should_stop():
                    return rendered
        except Exception as error:
            placement = renderer.placement
            if not is_cuda_oom(error) or placement is None:
                raise
            if not placement.step_down(renderer.pipe):
                raise TransientError(
                    f"CUDA out of memory on {placement.device} even with offload={placement.mode}"
                ) from error
    return rendered


def _render_and_write(
    renderer: Renderer,
    requests: Sequence[SampleRequest],
    *,
    samples_dir: Path,
    step: int,
    image_format: str,
    batch_size: int,
) -> Iterator[RenderedSample]:
    """Each image written atomically as soon as the renderer gives it."""
    lora_name = renderer.lora.path.name if renderer.lora is not None else None
    started = time.perf_counter()
    for request, image in renderer.render(requests, batch_size=batch_size):
        paths = write_sample(
            samples_dir,
            step,
            request,
            image,
            image_format=image_format,
            base_model=renderer.base_model,
            lora_name=lora_name,
            arch=renderer.spec.name,
        )
        now = time.perf_counter()
        yield RenderedSample(request=request, paths=paths, seconds=now - started)
        started = now


BASELINE_STEP = 0  # the base model without LoRA renders into step_000000


def render_command(
    *,
    checkpoint: Path | None,
    config_path: Path,
    process: int | str | None = None,
    prompts_file: Path | None = None,
    samples_dir: Path | None = None,
    step: int | None = None,
    baseline: bool = False,
    force: bool = False,
    overrides: dict[str, object] | None = None,
) -> int:
    """`sidecar render`: one checkpoint's samples (or the base model's, `--baseline`) to files.

    Samples whose image is already on disk are kept (a killed render picks up where it
    stopped) unless `force` renders them all again. Returns the exit code: 0 when every
    sample is on disk.
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
        try:
            folder = Path(samples_dir or settings.output or config.default_samples_dir(None))
        except ValueError as error:
            raise SidecarError(f"{error}; or pass `--output SAMPLES_DIR`") from error
        checkpoint = recorded_checkpoint(folder, step, plan.requests, force=force)
        if checkpoint is None:
            return 0  # queued for the running daemon
    if baseline:
        step = BASELINE_STEP
    elif step is None:
        step = checkpoint_step(checkpoint)
    samples_dir = Path(samples_dir or settings.output or config.default_samples_dir(checkpoint))
    requests = [
        request
        for request in plan.requests
        if force or not sample_paths(samples_dir, step, request.index, plan.image_format).image.is_file()
    ]
    if not requests:
        logger.info(
            "step %s already has its %d sample(s) in %s; --force renders them again",
            step,
            len(plan.requests),
            samples_dir,
        )
        return 0
    renderer = load_renderer(config, settings)
    if not baseline:
        renderer.apply_lora(checkpoint)
    started = time.perf_counter()
    rendered = render_samples(
        renderer,
        requests,
        samples_dir=samples_dir,
        step=step,
        image_format=plan.image_format,
        batch_size=plan.batch_size,
    )
    publish_step(samples_dir, step, plan.requests)
    logger.info(
        "rendered %d images in %.1f s into %s",
        len(rendered),
        time.perf_counter() - started,
        samples_dir / f"step_{step:06d}",
    )
    return 0 if len(rendered) == len(requests) else 1


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
    found = recognise(path, root=path.parent.parent) or recognise(path, root=path.parent)
    if found is not None:
        found = resolve_step(found)
    if found is None or found.step is None:
        raise CheckpointError(
            f"{path}: cannot tell the training step from the file name or its metadata; pass `--step N`"
        )
    return found.step
