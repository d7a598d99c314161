"""Open the renderer a config names; render requests and write each image as soon as it exists.

The core that `sidecar render` and the daemon's dispatcher share. Each image is written
atomically (publish stage) before the next is rendered, so a stop between two images
loses nothing that was already rendered.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from sidecar.errors import ModelError
from sidecar.plan.config import TrainerConfig
from sidecar.plan.request import SamplePlan, SampleRequest
from sidecar.publish.files import SamplePaths, write_sample
from sidecar.publish.video import write_video_sample
from sidecar.settings import Settings

if TYPE_CHECKING:  # the render stage loads torch and diffusers; imported where a render happens
    from sidecar.render.base import Renderer


@dataclass(frozen=True)
class RenderedSample:
    """One sample on disk."""

    request: SampleRequest
    paths: SamplePaths
    seconds: float  # wall time since the previous image (a batch's time falls on its first image)


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
    """Render `requests` with the renderer's current LoRA and write each image (a video model's
    frames as a video sample: `publish/video.py`).

    `should_stop` is asked after every image; when it says so, the images written so
    far are kept and the rest are left for later (the job store knows which). A CUDA
    out-of-memory error steps to a stronger memory mode (`Renderer.render_resilient`).
    """
    lora_name = renderer.lora.path.name if renderer.lora is not None else None
    rendered: list[RenderedSample] = []
    started = time.perf_counter()
    for request, output in renderer.render_resilient(requests, batch_size=batch_size):
        labels = {"base_model": renderer.base_model, "lora_name": lora_name, "arch": renderer.spec.name}
        if isinstance(output, list):  # a video model's frames: animated WebP, MP4 and .txt
            video = write_video_sample(samples_dir, step, request, output, **labels)  # type: ignore[arg-type]
            paths = SamplePaths(image=video.image, text=video.text)
        else:
            paths = write_sample(samples_dir, step, request, output, image_format=image_format, **labels)  # type: ignore[arg-type]
        now = time.perf_counter()
        sample = RenderedSample(request=request, paths=paths, seconds=now - started)
        started = now
        rendered.append(sample)
        on_sample(sample)
        if should_stop():
            break
    return rendered


def open_renderer(config: TrainerConfig, settings: Settings, plan: SamplePlan) -> Renderer:
    """The base model `config` names, loaded and placed as `settings` say, its memory mode
    (`offload auto`) planned for `plan`'s largest sample and batch and the trainer's LoRA rank.

    A model that does not load is a `ModelError` located at the config key naming it.
    """
    from sidecar.render.registry import load_renderer  # torch and diffusers: only once there is work

    try:
        return load_renderer(
            config.model_source(),
            device=settings.device,
            gpu=settings.render_gpu if settings.device is None else None,
            dtype=settings.dtype,
            offload=settings.offload,
            pixels=plan.largest_pixels,
            batch_size=plan.batch_size,
            lora_rank=config.lora_rank,
            compile=settings.compile,
        )
    except ModelError as error:
        raise error.located(config.where(f"model.{error.key}")) from error
