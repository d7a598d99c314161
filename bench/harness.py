"""Both sides of the end-to-end figures: the daemon watching a trainer's folder, and bare diffusers.

`DaemonHarness` runs the real daemon (`run_watch`, with its watchdog observer) in a
thread beside a `SimulatedTrainer` that writes each checkpoint in place, in chunks.
It timestamps three moments per checkpoint, all on `time.perf_counter`:

- *whole*: the trainer closed the file after its last chunk;
- *render start*: the renderer's `batch_start` event of the checkpoint's first pipeline call;
- *last sample*: the last image renamed into place, from its ctime (`wait_for_files` says
  why not by a watchdog observer, nor by a fine poll).

`BarePipeline` renders the same requests as plain diffusers calls: `from_pretrained`
once, then per checkpoint `load_lora_weights`, one call per image and a PIL save.
`BarePipeline.call_seconds` times the calls alone, the LoRA already applied: the bar.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bench.common import PROMPTS, TRIGGER, Profile
from sidecar.app.rendering import open_renderer
from sidecar.app.watch import Daemon, WatchRequest, run_watch
from sidecar.arch import Arch
from sidecar.plan.build import build_plan
from sidecar.plan.config import load_trainer_config
from sidecar.plan.request import SampleRequest
from sidecar.publish.files import sample_paths
from sidecar.testing.trainer import DEMO_NAME, SimulatedTrainer, write_trainer_config

SAMPLE_TIMEOUT_SECONDS = 120.0  # a checkpoint whose samples take longer has failed
ABANDON_SECONDS = 60.0
DAEMON_JOIN_SECONDS = 30.0
FILE_POLL_SECONDS = 0.05  # how often to look; the moment itself comes from the files' ctime


@dataclass(frozen=True)
class CheckpointTiming:
    """When one checkpoint became whole, began rendering, and had its last sample on disk."""

    step: int
    whole: float
    render_start: float
    last_sample: float

    @property
    def total_seconds(self) -> float:
        return self.last_sample - self.whole

    @property
    def detection_seconds(self) -> float:
        return self.render_start - self.whole


def wait_for_files(paths: Sequence[Path], *, alive: Callable[[], bool], timeout: float) -> float:
    """The moment the last of `paths` was put in place, on the `time.perf_counter` clock.

    Read from the files' ctime (sidecar renames each sample into place, which sets it), so the
    wait itself can be coarse: a poll every 2 ms took the GIL from the daemon's render thread
    often enough to slow a Python-bound `__call__` by 10 % (the deep tiny SDXL), and charged
    that to the daemon. Polled, not watched: watchdog's inotify emitter holds every rename
    (`IN_MOVED_FROM`) for 0.5 s to pair it with its `IN_MOVED_TO`.
    """
    deadline = time.monotonic() + timeout
    while True:
        missing = [path for path in paths if not path.exists()]
        if not missing:
            newest_ns = max(path.stat().st_ctime_ns for path in paths)
            return time.perf_counter() - max(0.0, (time.time_ns() - newest_ns) / 1e9)
        if not alive():
            raise RuntimeError(f"the daemon stopped before writing {missing[0]}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{missing[0]} did not appear within {timeout:.0f} s")
        time.sleep(FILE_POLL_SECONDS)


def write_config(
    folder: Path, *, arch: Arch, model_folder: Path, profile: Profile, prompts: int, steps: int
) -> Path:
    """An ai-toolkit-shaped trainer config whose `sample:` section is the benchmark's renders."""
    return write_trainer_config(
        folder / "trainer.yaml",
        model_folder=model_folder,
        training_folder=folder / "output",
        arch=arch,
        prompts=[PROMPTS[number % len(PROMPTS)] for number in range(prompts)],
        size_pixels=profile.size_pixels,
        sample_steps=steps,
        trigger_word=TRIGGER,
    )


class DaemonHarness:
    """The daemon in a thread, watching the folder a simulated trainer writes into.

    `settle_seconds` / `poll_interval_seconds` of None keep the `Settings` defaults.
    Use as a context manager; `save(step, data)` writes one checkpoint and waits for its samples.
    """

    def __init__(
        self,
        folder: Path,
        *,
        arch: Arch,
        model_folder: Path,
        profile: Profile,
        prompts: int,
        steps: int,
        settle_seconds: float | None,
        poll_interval_seconds: float | None,
        tensorboard: Path | None = None,
    ) -> None:
        self.config_path = write_config(
            folder, arch=arch, model_folder=model_folder, profile=profile, prompts=prompts, steps=steps
        )
        self.output_dir = folder / "output" / DEMO_NAME
        self.samples_dir = self.output_dir / "samples"
        self.staging = folder / "staging"
        self.request = WatchRequest(
            output_dir=self.output_dir,
            config_path=self.config_path,
            overrides={
                "device": "cpu",
                "abandon_seconds": ABANDON_SECONDS,
                "settle_seconds": settle_seconds,
                "poll_interval_seconds": poll_interval_seconds,
                "tensorboard": tensorboard,
            },
        )
        self.trainer = SimulatedTrainer(model_folder=model_folder, output_dir=self.output_dir, arch=arch)
        self.requests: tuple[SampleRequest, ...] = build_plan(load_trainer_config(self.config_path)).requests
        self._render_starts: list[float] = []
        self._thread = threading.Thread(target=self._run, name="bench-daemon", daemon=True)
        self._daemon: Daemon | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    # -- the daemon thread ---------------------------------------------------------------

    def _run(self) -> None:
        try:
            run_watch(self.request, renderer_factory=self._load_renderer, daemon_ready=self._on_daemon)
        except BaseException as error:  # handed to the main thread in __exit__
            self._error = error
        finally:
            self._ready.set()

    def _on_daemon(self, daemon: Daemon) -> None:
        self._daemon = daemon
        self._ready.set()

    def _load_renderer(self) -> Any:
        """What the daemon's default factory does, plus our render-start timestamps."""
        config = load_trainer_config(self.config_path)
        renderer = open_renderer(config, config.sidecar.merged(device="cpu"), build_plan(config))
        renderer.on_event = self._on_render_event
        return renderer

    def _on_render_event(self, event: str, fields: dict[str, Any]) -> None:
        if event == "batch_start":
            self._render_starts.append(time.perf_counter())

    # -- the context manager ---------------------------------------------------------------

    def __enter__(self) -> DaemonHarness:
        for folder in (self.output_dir, self.staging):
            folder.mkdir(parents=True, exist_ok=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise RuntimeError(f"the daemon did not start: {self._error}") from self._error
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._daemon is not None:
            self._daemon.request_stop()
        self._thread.join(DAEMON_JOIN_SECONDS)
        if self._error is not None and exc_info[0] is None:
            raise RuntimeError(f"the daemon failed: {self._error}") from self._error

    # -- checkpoints -------------------------------------------------------------------------

    def checkpoint_bytes(self, step: int) -> bytes:
        """The LoRA the simulated trainer saves at `step` (its weights grow with the step)."""
        return self.trainer.lora_bytes(step, self.staging, with_metadata=True)

    def save(self, step: int, data: bytes) -> CheckpointTiming:
        """Write a checkpoint in place as the trainer does, and wait until its last sample is on disk."""
        images = [sample_paths(self.samples_dir, step, request.index).image for request in self.requests]
        self.trainer.write_in_place(self.trainer.checkpoint_path(step), data)
        whole = time.perf_counter()
        last = wait_for_files(images, alive=self._thread.is_alive, timeout=SAMPLE_TIMEOUT_SECONDS)
        starts = [moment for moment in self._render_starts if moment >= whole]
        if not starts:
            raise RuntimeError(f"step {step}: samples appeared without a render start")
        return CheckpointTiming(step=step, whole=whole, render_start=starts[0], last_sample=last)


class BarePipeline:
    """The same renders as plain diffusers calls, in this process."""

    def __init__(self, model_folder: Path) -> None:
        from diffusers import DiffusionPipeline

        self.pipe = DiffusionPipeline.from_pretrained(model_folder, local_files_only=True)
        self.pipe.set_progress_bar_config(disable=True)

    def render_checkpoint(self, lora_path: Path, requests: Sequence[SampleRequest], folder: Path) -> None:
        """Swap the LoRA in (unload, load), render each request, save each image."""
        self.pipe.unload_lora_weights()
        self.pipe.load_lora_weights(str(lora_path))
        self.call_seconds(requests, folder)

    def call_seconds(self, requests: Sequence[SampleRequest], folder: Path) -> list[float]:
        """Render each request with the LoRA already applied, save each image; the calls' seconds."""
        folder.mkdir(parents=True, exist_ok=True)
        seconds = []
        for request in requests:
            started = time.perf_counter()
            image = self.pipe(
                prompt=request.prompt,
                negative_prompt=request.negative_prompt or None,
                width=request.width,
                height=request.height,
                num_inference_steps=request.steps,
                guidance_scale=request.guidance_scale,
                generator=torch.Generator("cpu").manual_seed(request.seed),
            ).images[0]
            seconds.append(time.perf_counter() - started)
            image.save(folder / f"sample_{request.index:02d}.png")
        return seconds
