"""`sidecar watch --runs runs.yaml`: one coordinator serving many training runs on a pool of workers.

The coordinator is today's daemon once per run, sharing the workers. Each run of the
sweep file gets the daemon's own pieces unchanged (`run_watch`: its lock, its watcher,
`Intake`, `JobStore` and `Dispatcher`), on a thread of its own, so what a run does with
its checkpoints, its store and its files (exactly once, backlog, retries, atomic writes,
grids, gallery, TensorBoard, `sidecar status OUTPUT_DIR`) is the daemon's, and a
coordinator killed mid-render recovers from the stores as the daemon does. Only the
renderer differs: `RemoteRenderer` sends each pipeline call to the shared
`sidecar.app.scheduler.Scheduler`, which picks a worker (runs in turn, each base where
it is loaded) and brings the images back for the run's thread to write.

Why a thread per run rather than one loop over every store: the daemon's dispatch loop
is reused as it is (no second copy of the exactly-once rules), a slow disk or a big
publish in one run never holds up another, and the file writes (PNG encoding, fsync)
of several runs overlap on several cores. Workers hold no state that must survive
them; the stores stay with the single writer, this process.

Runs are added and dropped as `runs.yaml` changes: an added run starts at once, a removed
(or changed) one stops after its current image. A run that stops on an error (a config
that does not load, a base model that does not load) is started again after a back-off.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from sidecar.app.commands import trainer_config
from sidecar.app.remote import RemoteRenderer
from sidecar.app.runs import FixedRuns, RunsFile, RunSpec
from sidecar.app.scheduler import Scheduler
from sidecar.app.watch import EXIT_FAILED, EXIT_OK, Daemon, WatchRequest, _stop_on_signals, run_watch
from sidecar.app.worker import BaseSpec, Pool, PoolOptions, build_pool
from sidecar.errors import SidecarError

logger = logging.getLogger("sidecar.coordinator")

RUN_THREAD_PREFIX = "run:"
RESTART_BASE_SECONDS = 30.0  # a run stopped by an error starts again after this; doubles each time
RESTART_MAX_SECONDS = 600.0
LOOP_SECONDS = 0.5  # the coordinator looks at runs.yaml and its runs this often
JOIN_SECONDS = 5.0


@dataclass
class RunThread:
    """One run of the sweep, served by the daemon's loop on its own thread."""

    spec: RunSpec
    scheduler: Scheduler
    overrides: dict[str, object]
    once: bool = False
    daemon: Daemon | None = None
    exit_code: int | None = None
    error: str | None = None
    _stopping: bool = False
    _thread: threading.Thread | None = field(default=None, repr=False)

    def start(self) -> None:
        name = f"{RUN_THREAD_PREFIX}{self.spec.name}"
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop after the current image."""
        self._stopping = True
        if self.daemon is not None:
            self.daemon.request_stop()

    @property
    def stopping(self) -> bool:
        return self._stopping

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def join(self, seconds: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(seconds)

    def _ready(self, daemon: Daemon) -> None:
        self.daemon = daemon
        if self._stopping:
            daemon.request_stop()

    def _renderer(self) -> RemoteRenderer:
        daemon = self.daemon
        assert daemon is not None
        plans, settings = daemon.intake.plans, daemon.settings
        base = BaseSpec(
            model=plans.config.model_source(),
            dtype=settings.dtype,
            offload=settings.offload,
            pixels=plans.plan.largest_pixels,
            batch_size=plans.plan.batch_size,
            lora_rank=plans.config.lora_rank,
        )
        assert self._thread is not None
        renderer = RemoteRenderer(
            run=self.spec.name, scheduler=self.scheduler, base=base, daemon=daemon, run_thread=self._thread
        )
        renderer.warm()
        return renderer

    def _run(self) -> None:
        spec = self.spec
        try:
            request = WatchRequest(
                output_dir=spec.output,
                config_path=trainer_config(spec.config, run_dir=spec.output),
                overrides={**self.overrides, "output": spec.samples or self.overrides.get("output")},
                process=spec.process,
                prompts_file=spec.prompts,
                once=self.once,
            )
            self.exit_code = run_watch(request, renderer_factory=self._renderer, daemon_ready=self._ready)  # type: ignore[arg-type]
        except SidecarError as error:
            self.error = str(error)
            logger.error("stopped: %s", error)
        except Exception as error:  # a bug must not take the other runs down
            self.error = f"{type(error).__name__}: {error}"
            logger.exception("stopped by an unexpected error")


class _RunNames(logging.Filter):
    """Log lines of a run's thread start with `[name]`: many runs share one log."""

    def filter(self, record: logging.LogRecord) -> bool:
        thread = record.threadName or ""
        if thread.startswith(RUN_THREAD_PREFIX) and not getattr(record, "sidecar_run", None):
            record.sidecar_run = thread.removeprefix(RUN_THREAD_PREFIX)
            record.msg = f"[{record.sidecar_run}] {record.msg}"
        return True


@contextlib.contextmanager
def _run_names_in_log() -> Iterator[None]:
    handlers = list(logging.getLogger().handlers)
    tag = _RunNames()
    for handler in handlers:
        handler.addFilter(tag)
    try:
        yield
    finally:
        for handler in handlers:
            handler.removeFilter(tag)


# Options of one daemon that a runs file serves otherwise (each run's config names its own).
PER_RUN_OPTIONS = {"output": "`samples:`", "tensorboard": "`sidecar.tensorboard` in its config"}
SHARED_CARD_OPTIONS = ("share_gpu", "slot_file")  # a pool's workers own their cards


@dataclass(frozen=True)
class CoordinatorRequest:
    """What `sidecar watch --runs` (or `watch OUTPUT_DIR --ray`) is asked to do.

    `runs_file` is followed while running; without one, `runs` is the fixed list.
    """

    runs_file: Path | None
    overrides: dict[str, object]  # the command line's settings, for every run; None values: not given
    once: bool = False  # render what every run has, then exit
    runs: tuple[RunSpec, ...] = ()

    @classmethod
    def from_command_line(
        cls,
        *,
        runs_file: Path | None,
        output_dir: Path | None,
        config: Path | None,
        process: int | str | None,
        prompts: Path | None,
        overrides: dict[str, object],
        once: bool,
    ) -> CoordinatorRequest:
        """A runs file, or one run (OUTPUT_DIR with `--ray`); options that cannot apply are refused."""
        for name in SHARED_CARD_OPTIONS:
            if overrides.get(name) is not None:
                raise SidecarError(
                    f"`--{name.replace('_', '-')}` shares a trainer's card; a worker pool does not"
                )
        if runs_file is None:
            if output_dir is None:
                raise SidecarError(
                    "`sidecar watch --ray` needs OUTPUT_DIR, or `--runs RUNS_YAML` for a sweep"
                )
            output = Path(output_dir).absolute()
            run = RunSpec(output.name, output, config=config, process=process, prompts=prompts)
            return cls(None, overrides, once=once, runs=(run,))
        given = {"OUTPUT_DIR": output_dir, "--config": config, "--process": process, "--prompts": prompts}
        for flag, value in given.items():
            if value is not None:
                raise SidecarError(f"`{flag}` and `--runs` disagree: the runs file names each run's")
        for name, instead in PER_RUN_OPTIONS.items():
            if overrides.get(name) is not None:
                raise SidecarError(f"`--{name}` would be shared by every run; give each run its {instead}")
        return cls(Path(runs_file), overrides, once=once)


class Coordinator:
    """The runs of `runs.yaml`, kept running as the file says; `loop_once(now)` at a time."""

    def __init__(self, request: CoordinatorRequest, scheduler: Scheduler) -> None:
        self.request = request
        self.scheduler = scheduler
        self.runs_file = (
            RunsFile(request.runs_file) if request.runs_file is not None else FixedRuns(list(request.runs))
        )
        self.threads: dict[str, RunThread] = {}
        self.finished: dict[str, RunThread] = {}  # runs that ended, by name (once: each ends once)
        self._restart_at: dict[str, float] = {}
        self._restarts: dict[str, int] = {}
        self._stop = threading.Event()

    @property
    def wanted(self) -> dict[str, RunSpec]:
        return {run.name: run for run in self.runs_file.runs}

    def request_stop(self) -> None:
        """Every run stops after its current image. Safe from a signal handler (sets flags)."""
        self._stop.set()
        for thread in list(self.threads.values()):
            thread.stop()

    @property
    def stop_requested(self) -> bool:
        return self._stop.is_set()

    def loop_once(self, now: float) -> bool:
        """Follow `runs.yaml`, reap ended runs, start the missing ones; False once all is done."""
        if not self.request.once:
            self.runs_file.reload_if_changed()
        wanted = self.wanted
        for name, thread in list(self.threads.items()):
            if name not in wanted or wanted[name] != thread.spec:
                if not thread.stopping:
                    logger.info("run %s %s; stopping it after its current image", name, _gone(name, wanted))
                thread.stop()
            if not thread.alive:
                self._ended(thread, wanted, now)
        if self.stop_requested:
            return bool(self.threads)
        for name, spec in wanted.items():
            if name in self.threads or now < self._restart_at.get(name, 0.0):
                continue
            if self.request.once and name in self.finished:
                continue
            self._start(spec)
        return bool(self.threads) or not self.request.once

    def _start(self, spec: RunSpec) -> None:
        logger.info("serving run %s: %s into %s", spec.name, spec.output, spec.samples_dir)
        thread = RunThread(spec, self.scheduler, self.request.overrides, once=self.request.once)
        self.threads[spec.name] = thread
        thread.start()

    def _ended(self, thread: RunThread, wanted: dict[str, RunSpec], now: float) -> None:
        name = thread.spec.name
        del self.threads[name]
        self.finished[name] = thread
        self.scheduler.forget_run(name)
        if thread.error is None or name not in wanted or wanted[name] != thread.spec or self.request.once:
            self._restarts.pop(name, None)
            return
        count = self._restarts.get(name, 0)
        delay = min(RESTART_BASE_SECONDS * 2**count, RESTART_MAX_SECONDS)
        self._restarts[name] = count + 1
        self._restart_at[name] = now + delay
        logger.warning("run %s stopped (%s); starting it again in %.0f s", name, thread.error, delay)

    def exit_code(self) -> int:
        """`once`: non-zero when a run failed to start or a checkpoint failed, as `watch --once`."""
        failed = any(t.error is not None or t.exit_code == EXIT_FAILED for t in self.finished.values())
        return EXIT_FAILED if self.request.once and failed else EXIT_OK

    def run(self) -> int:
        """Until stopped (a signal, `once` done); every run stops after its current image."""
        with _run_names_in_log(), _stop_on_signals(self.request_stop):
            source = self.request.runs_file or "the command line"
            logger.info("coordinating %s run(s) from %s", len(self.runs_file.runs), source)
            try:
                while not self.stop_requested and self.loop_once(time.time()):
                    self._stop.wait(LOOP_SECONDS)
            finally:
                self.request_stop()
                for thread in list(self.threads.values()):
                    while thread.alive:
                        thread.join(JOIN_SECONDS)
                self.loop_once(time.time())
        return self.exit_code()


def _gone(name: str, wanted: dict[str, RunSpec]) -> str:
    return "was removed from the runs file" if name not in wanted else "changed in the runs file"


def run_coordinator(
    request: CoordinatorRequest,
    *,
    pool: Pool | None = None,
    options: PoolOptions | None = None,
    coordinator_ready: Callable[[Coordinator], None] | None = None,
) -> int:
    """`sidecar watch --runs`: the exit code. A `pool` passed in stays open (the caller's);
    otherwise one is built from `options` and closed at the end."""
    if request.runs_file is not None:
        RunsFile(request.runs_file)  # a bad file stops here, before any worker starts
    owned = pool is None
    pool = pool if pool is not None else build_pool(options or PoolOptions())
    scheduler = Scheduler(pool).start()
    try:
        coordinator = Coordinator(request, scheduler)
        if coordinator_ready is not None:
            coordinator_ready(coordinator)
        return coordinator.run()
    finally:
        scheduler.close()
        if owned:
            pool.close()
