"""A render worker: one warm pipeline for one base model at a time, plain data in and out.

The coordinator (`sidecar.app.coordinator`) keeps every job store, file and decision; a
worker only renders. It is told, per task, the base model (`BaseSpec`), the checkpoint
(`RenderTask.lora_source`: a path here, a Ray object in `sidecar.app.pool`) and the sample
requests, and returns the images with what it holds afterwards (`TaskResult`), so the
coordinator can send the next checkpoint of the same base where it is already loaded.

The same class serves in process (`LocalPool`, no Ray) and inside a Ray actor
(`sidecar.app.pool`): Ray's examples wrap one warm model in an actor with one method
taking and returning plain data, and so does this. Errors never cross as exceptions
(a custom exception may not survive pickling between processes): they come back as a
`WorkerFailure`, which `failure_error` turns into the error the dispatcher already
knows how to record.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

from sidecar.errors import CheckpointError, LoraError, ModelError, SamplerError, SidecarError, TransientError
from sidecar.plan.request import ModelSource, SampleRequest

if TYPE_CHECKING:  # the render stage loads torch and diffusers: imported where a worker renders
    from PIL import Image

    from sidecar.render.base import Renderer

logger = logging.getLogger("sidecar.worker")

FailureKind = Literal["model", "checkpoint", "transient", "unexpected"]
# SidecarError subclasses rebuilt by name on the coordinator's side (the rest become SidecarError).
KNOWN_ERRORS: dict[str, type[SidecarError]] = {
    cls.__name__: cls for cls in (CheckpointError, LoraError, SamplerError, SidecarError)
}


@dataclass(frozen=True)
class BaseSpec:
    """The base model a run renders with, and how it is loaded: what a worker keeps warm.

    `pixels`, `batch_size` and `lora_rank` only size `offload auto`'s memory plan; they are
    not part of `key`, so runs of one base with other sample sizes share its pipeline.
    """

    model: ModelSource
    dtype: str = "auto"
    offload: str = "none"
    pixels: int = 1024 * 1024
    batch_size: int = 1
    lora_rank: int | None = None

    @property
    def key(self) -> str:
        """Equal for runs that can share one loaded pipeline."""
        model = self.model
        encoders = sorted((name, str(path)) for name, path in dict(model.text_encoder_paths).items() if path)
        parts = (model.arch, model.name_or_path, model.vae_path, encoders, model.quantize, model.low_vram)
        return repr((*parts, self.dtype, self.offload))

    @property
    def label(self) -> str:
        return f"{self.model.arch} {self.model.label}"


@dataclass(frozen=True)
class RenderTask:
    """One render: a base, a checkpoint, and the requests to render with it (none: load only).

    `lora_key` names the checkpoint's content (its cache path holds its SHA-256); a worker
    holding that LoRA already renders at once. `lora_source` is what the pool gives the
    worker to read it from.
    """

    base: BaseSpec
    requests: tuple[SampleRequest, ...] = ()
    lora_key: str | None = None
    lora_name: str = "lora.safetensors"
    lora_source: Any = None
    batch_size: int = 1


@dataclass(frozen=True)
class WorkerFailure:
    """Why a task stopped, as plain data; `failure_error` rebuilds the error."""

    kind: FailureKind
    message: str
    error_type: str = "SidecarError"
    model_key: str | None = None  # ModelError: the `model:` key whose file did not load
    detail: str | None = None  # ModelError: the message without the key
    worker_traceback: str | None = None  # unexpected errors: where it happened, for the log


@dataclass(frozen=True)
class RenderedImage:
    index: int  # the request's sample index
    image: Image.Image


@dataclass(frozen=True)
class TaskResult:
    """What a worker gives back: the images rendered, why it stopped early, and what it holds now."""

    images: tuple[RenderedImage, ...] = ()
    failure: WorkerFailure | None = None
    base_key: str | None = None  # the base loaded after the task (None: none, e.g. it failed to load)
    lora_key: str | None = None  # the LoRA applied after the task
    load_seconds: float = 0.0  # > 0 when this task loaded the base
    render_seconds: float = 0.0
    pid: int = 0


def describe_failure(error: BaseException) -> WorkerFailure:
    """An exception raised while loading, applying or rendering, as plain data."""
    from sidecar.render.devices import is_cuda_oom  # torch is loaded on a worker anyway

    if isinstance(error, ModelError):
        return WorkerFailure("model", str(error), "ModelError", model_key=error.key, detail=error.detail)
    if isinstance(error, TransientError):
        return WorkerFailure("transient", str(error), type(error).__name__)
    if isinstance(error, SidecarError):
        return WorkerFailure("checkpoint", str(error), type(error).__name__)
    if is_cuda_oom(error):
        return WorkerFailure("transient", f"out of memory: {str(error).splitlines()[0]}", "OutOfMemoryError")
    return WorkerFailure(
        "unexpected",
        f"{type(error).__name__}: {error}",
        type(error).__name__,
        worker_traceback="".join(traceback.format_exception(error)),
    )


def failure_error(failure: WorkerFailure) -> Exception:
    """The error the dispatcher records for a failed task (its message says what happened)."""
    if failure.kind == "model":
        return ModelError(failure.detail or failure.message, key=failure.model_key or "name_or_path")
    if failure.kind == "transient":
        return TransientError(failure.message)
    if failure.kind == "checkpoint":
        return KNOWN_ERRORS.get(failure.error_type, SidecarError)(failure.message)
    return RuntimeError(f"{failure.message} (on a render worker)")


RendererFactory = Callable[[BaseSpec, str | None, int | None], "Renderer"]


def load_base(spec: BaseSpec, device: str | None, gpu: int | None) -> Renderer:
    """The base model of `spec`, loaded and placed as the daemon loads it."""
    from sidecar.render.registry import load_renderer

    return load_renderer(
        spec.model,
        device=device,
        gpu=gpu,
        dtype=spec.dtype,
        offload=spec.offload,
        pixels=spec.pixels,
        batch_size=spec.batch_size,
        lora_rank=spec.lora_rank,
    )


@dataclass
class RenderWorker:
    """Keeps one base warm and swaps each checkpoint's LoRA into it in place.

    `renderer_factory(spec, device, gpu)` loads a base (tests pass a counting one).
    `loads` lists the base keys loaded, in order: the affinity the coordinator aims for
    shows as one load per base, not one per checkpoint.
    """

    device: str | None = None
    gpu: int | None = None
    renderer_factory: RendererFactory = load_base
    loads: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.renderer: Renderer | None = None
        self.base_key: str | None = None
        self.lora_key: str | None = None

    def info(self) -> dict[str, Any]:
        """What this worker holds and has loaded (for tests and the bench)."""
        return {"pid": os.getpid(), "base_key": self.base_key, "lora_key": self.lora_key, "loads": self.loads}

    def render(self, task: RenderTask) -> TaskResult:
        """Load the base if it is not the one held, apply the LoRA if it is not the one applied,
        render the requests; the images done before a failure come back with it."""
        images: list[RenderedImage] = []
        load_seconds = 0.0
        started = time.perf_counter()
        failure = None
        try:
            if self.base_key != task.base.key:
                load_seconds = self._load(task.base)
            started = time.perf_counter()
            if task.requests:
                self._apply(task)
                renderer = self.renderer
                assert renderer is not None
                for request, image in renderer.render_resilient(task.requests, batch_size=task.batch_size):
                    images.append(RenderedImage(request.index, image))
        except Exception as error:
            failure = describe_failure(error)
            if failure.kind == "unexpected":
                logger.error("render task failed:\n%s", failure.worker_traceback)
        return TaskResult(
            images=tuple(images),
            failure=failure,
            base_key=self.base_key,
            lora_key=self.lora_key,
            load_seconds=load_seconds,
            render_seconds=time.perf_counter() - started,
            pid=os.getpid(),
        )

    def _load(self, spec: BaseSpec) -> float:
        """Drop the base held (one pipeline per worker) and load `spec`'s; returns the seconds."""
        self.renderer, self.base_key, self.lora_key = None, None, None
        _free_memory()
        started = time.perf_counter()
        self.renderer = self.renderer_factory(spec, self.device, self.gpu)
        self.base_key = spec.key
        self.loads.append(spec.key)
        seconds = time.perf_counter() - started
        logger.info("loaded %s in %.1f s", spec.label, seconds)
        return seconds

    def _apply(self, task: RenderTask) -> None:
        if task.lora_key is None or task.lora_key == self.lora_key:
            return
        renderer = self.renderer
        assert renderer is not None
        self.lora_key = None  # a LoRA that does not apply leaves the base without one
        renderer.apply_lora(self.lora_path(task))
        self.lora_key = task.lora_key

    def lora_path(self, task: RenderTask) -> Path:
        """Where to read the task's LoRA; in process the coordinator's cached copy itself."""
        return Path(task.lora_source)


def _free_memory() -> None:
    """Give the dropped pipeline's memory back before the next one loads."""
    import gc

    gc.collect()
    from sidecar.render.devices import free_cuda_cache

    free_cuda_cache()


class Pool(Protocol):
    """Workers that render `RenderTask`s: `LocalPool` here, `sidecar.app.pool.RayPool` on Ray."""

    @property
    def size(self) -> int: ...

    def submit(self, index: int, task: RenderTask) -> concurrent.futures.Future[TaskResult]: ...

    def lora_source(self, path: Any) -> Any: ...

    def worker_lost(self, error: BaseException) -> bool: ...

    def revive(self, index: int) -> concurrent.futures.Future[None]: ...

    def info(self) -> list[dict[str, Any]]: ...

    def close(self) -> None: ...


class LocalPool:
    """One worker in this process, on a thread of its own: `sidecar watch --runs` without Ray.

    The runs take turns on it (`sidecar.app.scheduler`); nothing here imports Ray.
    """

    def __init__(self, worker: RenderWorker | None = None) -> None:
        self.worker = worker if worker is not None else RenderWorker()
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="render")

    @property
    def size(self) -> int:
        return 1

    def submit(self, index: int, task: RenderTask) -> concurrent.futures.Future[TaskResult]:
        return self._executor.submit(self.worker.render, task)

    def lora_source(self, path: Path) -> Path:
        return Path(path)

    def worker_lost(self, error: BaseException) -> bool:
        return False  # an in-process worker cannot die without the coordinator

    def revive(self, index: int) -> concurrent.futures.Future[None]:
        done: concurrent.futures.Future[None] = concurrent.futures.Future()
        done.set_result(None)
        return done

    def info(self) -> list[dict[str, Any]]:
        return [self.worker.info()]

    def close(self) -> None:
        self._executor.shutdown(wait=True)


@dataclass(frozen=True)
class PoolOptions:
    """Where renders run: in process (no `ray`), or on Ray workers.

    `ray`: `local` starts Ray on this machine; `auto` joins the cluster this node is part
    of (`ray start`); anything else is a cluster address. `workers`: how many (default:
    one per `gpus_per_worker` GPUs of the cluster; one with `device: cpu`). `device`:
    `cpu` makes CPU workers (one CPU and one torch thread each).
    """

    ray: str | None = None
    workers: int | None = None
    gpus_per_worker: float = 1.0
    device: str | None = None
    gpu: int | None = None

    def __post_init__(self) -> None:
        if self.workers is not None and self.workers < 1:
            raise SidecarError(f"`--workers` must be a positive integer, got {self.workers}")
        if self.gpus_per_worker <= 0:
            raise SidecarError(f"`--gpus-per-worker` must be a positive number, got {self.gpus_per_worker:g}")
        if self.ray is None and self.workers not in (None, 1):
            raise SidecarError(
                f"`--workers {self.workers}` needs `--ray`; without it one renderer serves all"
            )
        if self.ray is not None and self.gpu is not None:
            raise SidecarError("`--gpu` and `--ray` disagree: Ray gives workers their cards")


def build_pool(options: PoolOptions, *, renderer_factory: Callable[..., Any] | None = None) -> Pool:
    """The pool `options` ask for; Ray is imported only here, and only with `ray` set."""
    if options.ray is None:
        worker = RenderWorker(device=options.device, gpu=options.gpu)
        if renderer_factory is not None:
            worker.renderer_factory = renderer_factory
        return LocalPool(worker)
    from sidecar.app.pool import RayPool

    return RayPool.start(options, renderer_factory=renderer_factory)


def chunks(requests: Sequence[SampleRequest], batch_size: int) -> list[tuple[SampleRequest, ...]]:
    """Requests in tasks of `batch_size`, in order: one task is one pipeline call when their
    settings are equal (the worker's renderer groups unequal ones into separate calls)."""
    if batch_size < 1:
        raise ValueError(f"`batch_size` must be a positive integer, got {batch_size!r}")
    return [tuple(requests[start : start + batch_size]) for start in range(0, len(requests), batch_size)]
