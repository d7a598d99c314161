"""Render workers as Ray actors: the only module that imports `ray` (`sidecar watch --runs --ray`).

Each worker is an actor wrapping `sidecar.app.worker.RenderWorker`: one warm pipeline,
one method taking and returning plain data, resources declared on the actor
(`num_gpus`, or one CPU for `--device cpu`), as in Ray's own examples. What must survive
a crash stays with the coordinator (the job stores), so an actor may die at any time:
Ray restarts it (`max_restarts=-1`), never retries its task itself (`max_task_retries=0`:
the coordinator's scheduler sends the samples to the next free worker, counting deaths
per checkpoint), and `revive` tells the scheduler when it is back.

Checkpoints travel through Ray's object store (`lora_source`), so only the base models
must be on every GPU node (the same path, or the same Hugging Face cache); the trainers'
folders and the samples folders are the coordinator's alone.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray
from ray.exceptions import ActorUnavailableError, RayActorError

from sidecar.app.worker import PoolOptions, RenderTask, RenderWorker, TaskResult, load_base
from sidecar.errors import SidecarError
from sidecar.weights import split_sibling

logger = logging.getLogger("sidecar.pool")

CPU_WORKER_CPUS = 1  # a CPU worker renders with one torch thread
WORKER_CPUS = 1  # a GPU worker's share of its node's CPUs
OFFLINE_ENV = {  # workers never download, as sidecar never does (`sidecar.cli.quiet_libraries`)
    "HF_HUB_OFFLINE": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "DIFFUSERS_VERBOSITY": "error",
}


class _ActorWorker(RenderWorker):
    """`RenderWorker` inside an actor: LoRA bytes come from the object store into a local file."""

    def __init__(self, *, device: str | None, gpu: int | None, threads: int | None, factory: Any) -> None:
        super().__init__(device=device, gpu=gpu, renderer_factory=factory or load_base)
        if threads is not None:
            import torch

            torch.set_num_threads(threads)
        sidecar_logger = logging.getLogger("sidecar")
        sidecar_logger.setLevel(logging.INFO)
        if not sidecar_logger.handlers:  # the actor's stderr goes to the driver's log (`log_to_driver`)
            sidecar_logger.addHandler(logging.StreamHandler())
        self._folder = Path(tempfile.mkdtemp(prefix="sidecar-worker-"))

    def __repr__(self) -> str:  # Ray prefixes the worker's log lines with it
        return "sidecar-worker"

    def ready(self) -> int:
        """Answers once the actor runs (after a restart too): its process id."""
        return os.getpid()

    def lora_path(self, task: RenderTask) -> Path:
        """The LoRA as a local file: the bytes the coordinator put in the object store, written
        once per checkpoint (a file name is kept, since some trainers' names tell the format)."""
        folder = self._folder / hashlib.sha256(str(task.lora_key).encode()).hexdigest()[:16]
        path = folder / Path(task.lora_name or "lora.safetensors").name
        if not path.is_file():
            shutil.rmtree(self._folder, ignore_errors=True)  # the previous checkpoint is done with
            # nested in a list: fetched only here, when needed
            write_lora_files(folder, ray.get(task.lora_source[0]))
        return path


def lora_files(path: Path) -> dict[str, bytes]:
    """`{file name: bytes}` of a checkpoint: the file, and its split Wan 2.2 sibling where there is
    one beside it (the worker's renderer looks for it there, as on the coordinator)."""
    sibling = split_sibling(path)
    files = [path] if sibling is None or not sibling.is_file() else [path, sibling]
    return {file.name: file.read_bytes() for file in files}


def write_lora_files(folder: Path, files: dict[str, bytes]) -> None:
    """`lora_files` written into `folder` (made here) under their names, each whole or not at all."""
    folder.mkdir(parents=True)
    for name, data in files.items():
        path = folder / Path(name).name
        partial = path.with_name(path.name + ".partial")
        partial.write_bytes(data)
        partial.replace(path)


RenderActor = ray.remote(_ActorWorker)


def _future(ref: Any) -> concurrent.futures.Future[Any]:
    return ref.future()


def init_ray(address: str, *, object_store_bytes: int | None = None, num_cpus: int | None = None) -> bool:
    """Connect to Ray (`local`: start it here); True when this call started it."""
    if ray.is_initialized():
        return False
    runtime_env = {"env_vars": dict(OFFLINE_ENV)}
    if address == "local":
        ray.init(
            include_dashboard=False,
            object_store_memory=object_store_bytes,
            num_cpus=num_cpus,
            runtime_env=runtime_env,
            logging_level=logging.WARNING,
        )
        return True
    ray.init(address=address, runtime_env=runtime_env, logging_level=logging.WARNING)
    return True


class RayPool:
    """Workers as Ray actors; see the module docstring. `start` builds one from `PoolOptions`."""

    def __init__(self, actors: list[Any], *, shutdown: bool = False) -> None:
        self.actors = actors
        self._shutdown = shutdown

    @classmethod
    def start(
        cls,
        options: PoolOptions,
        *,
        renderer_factory: Callable[..., Any] | None = None,
        object_store_bytes: int | None = None,
        num_cpus: int | None = None,
    ) -> RayPool:
        """Connect (or start Ray, `local`), then start the workers; they load bases on first use."""
        started = init_ray(options.ray or "local", object_store_bytes=object_store_bytes, num_cpus=num_cpus)
        cpu = options.device is not None and options.device.startswith("cpu")
        count = options.workers or _default_workers(cpu=cpu, gpus_per_worker=options.gpus_per_worker)
        resources = (
            {"num_cpus": CPU_WORKER_CPUS, "num_gpus": 0}
            if cpu
            else {"num_cpus": WORKER_CPUS, "num_gpus": options.gpus_per_worker}
        )
        actors = [
            RenderActor.options(max_restarts=-1, max_task_retries=0, **resources).remote(
                device="cpu" if cpu else None,
                gpu=None if cpu else 0,  # Ray makes the worker's cards the only ones it sees
                threads=CPU_WORKER_CPUS if cpu else None,
                factory=renderer_factory,
            )
            for _ in range(count)
        ]
        kind = "CPU" if cpu else f"{options.gpus_per_worker:g}-GPU"
        logger.info("%s %s worker(s) on Ray (%s)", count, kind, options.ray)
        _warn_if_short(count, resources)
        return cls(actors, shutdown=started)

    @property
    def size(self) -> int:
        return len(self.actors)

    def submit(self, index: int, task: RenderTask) -> concurrent.futures.Future[TaskResult]:
        return _future(self.actors[index].render.remote(task))

    def lora_source(self, path: Path) -> list[Any]:
        """The checkpoint's files in the object store, once per checkpoint; nested in a list so a
        worker that already holds the LoRA never fetches them."""
        return [ray.put(lora_files(Path(path)))]

    def worker_lost(self, error: BaseException) -> bool:
        return isinstance(error, (RayActorError, ActorUnavailableError))

    def revive(self, index: int) -> concurrent.futures.Future[None]:
        return _future(self.actors[index].ready.remote())

    def info(self) -> list[dict[str, Any]]:
        return ray.get([actor.info.remote() for actor in self.actors])

    def close(self) -> None:
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        self.actors = []
        if self._shutdown:
            ray.shutdown()


def _default_workers(*, cpu: bool, gpus_per_worker: float) -> int:
    """One CPU worker; or as many GPU workers as the cluster's GPUs hold."""
    if cpu:
        return 1
    gpus = float(ray.cluster_resources().get("GPU", 0))
    count = int(gpus // gpus_per_worker)
    if count < 1:
        raise SidecarError(
            f"the Ray cluster has {gpus:g} GPU(s), fewer than `--gpus-per-worker` {gpus_per_worker:g}; "
            "add GPU nodes (`ray start --address=HEAD:6379` on each), or `--device cpu` for CPU workers"
        )
    return count


def _warn_if_short(count: int, resources: dict[str, float]) -> None:
    """Workers the cluster has no room for wait for nodes (an autoscaler may add them); say so."""
    cluster = ray.cluster_resources()
    for name, key in (("num_gpus", "GPU"), ("num_cpus", "CPU")):
        wanted, present = count * resources[name], float(cluster.get(key, 0))
        if wanted > present:
            logger.warning(
                "%s worker(s) need %g %s(s), the cluster has %g; the rest start when nodes join",
                count,
                wanted,
                key,
                present,
            )
