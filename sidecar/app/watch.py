"""`sidecar watch`: the daemon. Watch a trainer's output, render each checkpoint exactly once.

The process wires the stages: a watchdog observer feeds an event queue; the `Intake`
turns events into ready checkpoints in the job store; the `Dispatcher` renders them and
hands each step to a `StepPublisher` thread (grid, gallery, TensorBoard), so publishing
never delays the next checkpoint. Both loops expose `loop_once(now)`; the outer loop here
alternates them, backs off when idle (waking on watcher events), and stops on a signal,
`once`, `stop_after`, or `until()`. As soon as the intake sees checkpoints coming (the
startup scan's, or the first a trainer writes), the base model starts loading on a thread,
so loading overlaps their settling, copy and hashing.

One daemon per samples folder: a lock file refuses a second one. A store left by a
process killed mid-render is recovered on open, so every sample is rendered exactly once.
The samples folder's own entries (`.sidecar` and what it holds) are checked before anything
is written: one that is a symlink or of the wrong kind stops the daemon with its name. A
watcher that dies is restarted, or the process exits non-zero: never a live daemon that
sees nothing.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from sidecar.app.dispatch import Dispatcher, RendererFactory
from sidecar.app.intake_loop import Intake
from sidecar.app.plan_source import PlanSource
from sidecar.app.rendering import open_renderer
from sidecar.app.state import check_samples_folder
from sidecar.errors import SidecarError
from sidecar.intake.cache import CheckpointCache
from sidecar.intake.steps import StepCounter
from sidecar.intake.watcher import CheckpointWatcher, FileEvent
from sidecar.jobs.locks import process_lock
from sidecar.jobs.store import JobStore
from sidecar.publish.files import remove_stale_temp_files
from sidecar.publish.step import StepPublisher
from sidecar.publish.tensorboard import TensorBoardSink, tensorboard_dir_for
from sidecar.render.slots import AlwaysOpen, SlotGate, build_probe
from sidecar.settings import SamplesFolder, Settings, samples_dir

logger = logging.getLogger("sidecar.daemon")

SLEEP_SLICE_SECONDS = 0.1  # the idle sleep is cut in slices so a stop flag is seen quickly
SETTLE_CHECKS = 5  # while a file settles, look at it this many times per settle time
MIN_WAIT_SECONDS = 0.01
MAX_LOOP_ERRORS_IN_A_ROW = 10  # the loop itself failing this often (a broken store): give up
MAX_WATCHER_RESTARTS = 3  # the watcher dying more often than this within the window: exit non-zero
WATCHER_RESTART_WINDOW_SECONDS = 600.0

EXIT_OK = 0
EXIT_FAILED = 1  # `once`: a checkpoint failed during this run


@dataclass(frozen=True)
class WatchRequest:
    """What `sidecar watch` is asked to do; how it runs is in `settings` (CLI over config)."""

    output_dir: Path
    config_path: Path
    overrides: dict[str, object]  # the command line's settings; None values mean "not given"
    process: int | str | None = None
    prompts_file: Path | None = None
    once: bool = False  # exit when nothing is left to do after the startup scan
    stop_after: int | None = None  # exit after rendering this many checkpoints

    def __post_init__(self) -> None:
        for name in ("output_dir", "config_path", "prompts_file"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, Path):
                object.__setattr__(self, name, Path(value))
        if self.stop_after is not None and self.stop_after < 1:
            raise ValueError(f"`stop_after` must be a positive integer or None, got {self.stop_after!r}")


class WatcherDied(SidecarError):
    """The watcher kept failing: the process ends non-zero, so systemd or supervisor restarts it."""


@dataclass
class Daemon:
    """The two loops of a running daemon, and what the outer loop needs of them."""

    intake: Intake
    dispatcher: Dispatcher
    settings: Settings
    watcher: CheckpointWatcher | None = None
    watcher_restarts: list[float] = field(default_factory=list)  # when the watcher was restarted

    def request_stop(self) -> None:
        self.dispatcher.request_stop()

    @property
    def stop_requested(self) -> bool:
        return self.dispatcher.stop_requested

    def loop_once(self, now: float) -> bool:
        self.check_watcher(now)
        if self.dispatcher.renderer is None and self.intake.expects_work():
            self.dispatcher.preload()  # the base loads while the intake settles, copies and hashes
        did_work = self.intake.loop_once(now)
        self.dispatcher.state.set_waiting(self.intake.waiting(), now)
        return self.dispatcher.loop_once(now) or did_work

    def check_watcher(self, now: float) -> None:
        """A dead watcher is never left running unnoticed: it is restarted (a fresh observer and a
        rescan), or, after `MAX_WATCHER_RESTARTS` within `WATCHER_RESTART_WINDOW_SECONDS`, the
        daemon stops with `WatcherDied` and the process exits non-zero."""
        if self.watcher is None:
            return
        problem = self.watcher.problem()
        if problem is None:
            return
        self.watcher_restarts = [t for t in self.watcher_restarts if now - t < WATCHER_RESTART_WINDOW_SECONDS]
        if len(self.watcher_restarts) >= MAX_WATCHER_RESTARTS:
            raise WatcherDied(
                f"the checkpoint watcher failed {len(self.watcher_restarts) + 1} times in "
                f"{WATCHER_RESTART_WINDOW_SECONDS:.0f} s ({problem}); stopping so that the service "
                "manager restarts sidecar"
            )
        self.watcher_restarts.append(now)
        logger.error("%s; restarting the watcher and looking at the whole folder again", problem)
        self.watcher.restart()

    def wait_for_work(self, seconds: float) -> None:
        """The idle back-off: ends as soon as the watcher has news, a stop is asked, or
        (while files are settling) soon enough to see them settle.

        Waits on the event queue's own condition, looking at `queue` directly: `qsize()`
        takes the same lock and would deadlock here.
        """
        if self.intake.tracking:
            seconds = min(seconds, max(self.settings.settle_seconds / SETTLE_CHECKS, MIN_WAIT_SECONDS))
        events = self.intake.events
        deadline = time.monotonic() + seconds
        with events.not_empty:
            while not events.queue and not self.stop_requested:
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                events.not_empty.wait(min(left, SLEEP_SLICE_SECONDS))


@contextlib.contextmanager
def _stop_on_signals(stop: Callable[[], None]) -> Iterator[None]:
    """SIGTERM and SIGINT call `stop` (which only sets a flag); the old handlers come back after."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signals can only be handled on the main thread; the caller stops us
        return
    previous = {number: signal.getsignal(number) for number in (signal.SIGTERM, signal.SIGINT)}

    def handler(number: int, frame: object) -> None:
        stop()

    for number in previous:
        signal.signal(number, handler)
    try:
        yield
    finally:
        for number, old in previous.items():
            signal.signal(number, old)


def build_slot_gate(settings: Settings) -> SlotGate:
    """The gate `--share-gpu` / `--slot-file` ask for; always open on a card of its own."""
    if settings.share_gpu is None and settings.slot_file is None:
        return SlotGate(AlwaysOpen())
    uuid = None
    if settings.share_gpu is not None:
        from sidecar.render.devices import cuda_uuid  # torch: only where a card is shared

        uuid = cuda_uuid(settings.share_gpu)
    probe = build_probe(
        share_gpu=settings.share_gpu,
        slot_file=settings.slot_file,
        slot_file_mode=settings.slot_file_mode,
        cuda_uuid=uuid,
    )
    return SlotGate(probe)


def run_watch(
    request: WatchRequest,
    *,
    renderer_factory: RendererFactory | None = None,
    slot_gate: SlotGate | None = None,
    until: Callable[[], bool] | None = None,
    daemon_ready: Callable[[Daemon], None] | None = None,
) -> int:
    """`sidecar watch`: run until stopped (signal, `once`, `stop_after`, or `until()`); exit code.

    `until` is asked between iterations; once it says True the daemon takes a last look at
    the output folder, renders what is left and exits (the demo's simulated trainer uses it).
    `daemon_ready` gets the daemon once it exists (tests use it to stop a daemon thread).
    Raises `SidecarError` for a bad config or a base model that cannot be loaded.
    """
    plans = PlanSource(request.config_path, process=request.process, prompts_file=request.prompts_file)
    settings = plans.config.sidecar.merged(**request.overrides)
    output_dir = request.output_dir.resolve()
    folder = SamplesFolder(samples_dir(settings.output, run_dir=output_dir))
    if not output_dir.is_dir():
        logger.info("%s does not exist yet; creating it, as the trainer would", output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
    check_samples_folder(folder, inside=output_dir if settings.output is None else None)
    ignore = (folder.root.absolute(),)  # sidecar's own files are never checkpoints
    gate = slot_gate if slot_gate is not None else build_slot_gate(settings)
    factory = renderer_factory or (lambda: open_renderer(plans.config, settings, plans.plan))
    events: queue.Queue[FileEvent] = queue.Queue()
    started = time.time()
    with process_lock(folder.lock, what=str(folder.root)):
        remove_stale_temp_files(folder.root)
        with JobStore(folder.jobs, now=started) as store:
            cache = CheckpointCache(folder.cache)
            steps = StepCounter()
            pattern = settings.compiled_pattern
            intake = Intake(
                output_dir=output_dir,
                events=events,
                store=store,
                cache=cache,
                plans=plans,
                steps=steps,
                pattern=pattern,
                ignore=ignore,
                follow_symlinks=settings.follow_symlinks,
                settle_seconds=settings.settle_seconds,
                abandon_seconds=settings.abandon_seconds,
            )
            tensorboard_dir = tensorboard_dir_for(
                option=settings.tensorboard,
                log_dir=plans.config.log_dir,
                name=plans.config.name,
                samples_dir=folder.root,
            )
            tensorboard = TensorBoardSink(tensorboard_dir) if tensorboard_dir is not None else None
            if tensorboard is not None:
                logger.info("samples also go to TensorBoard in %s", tensorboard_dir)
            dispatcher = Dispatcher(
                store=store,
                cache=cache,
                samples_dir=folder.root,
                plans=plans,
                steps=steps,
                renderer_factory=factory,
                gate=gate,
                backlog=settings.backlog,
                take_in=intake.loop_once,
                publisher=StepPublisher(folder.root, tensorboard=tensorboard),
            )
            watcher = CheckpointWatcher(
                output_dir,
                events,
                pattern=pattern,
                ignore=ignore,
                use_polling=settings.polling,
                polling_interval_seconds=settings.poll_interval_seconds,
            )
            daemon = Daemon(intake=intake, dispatcher=dispatcher, settings=settings, watcher=watcher)
            if daemon_ready is not None:
                daemon_ready(daemon)
            logger.info(
                "rendering %s sample(s) per checkpoint of %s into %s (backlog: %s)",
                len(plans.plan.requests),
                output_dir,
                folder.root,
                settings.backlog,
            )
            try:
                watcher.start()
            except OSError as error:  # e.g. the inotify watch limit: polling still works
                logger.warning("filesystem events unavailable (%s); polling instead", error)
                watcher.use_polling = True
                watcher.start()
            try:
                watcher.scan()
                with _stop_on_signals(daemon.request_stop):
                    _run_loop(daemon, request, until)
            finally:
                watcher.stop()
                dispatcher.close()
                cache.close()
                if tensorboard is not None:
                    tensorboard.close()
            failed = store.failed_since(started)
    if daemon.stop_requested:
        logger.info("stopped cleanly")
    if request.once and failed:
        return EXIT_FAILED
    return EXIT_OK


def _sleep(seconds: float, daemon: Daemon) -> None:
    """The back-off after a loop error, cut into slices so a stop request is noticed quickly."""
    deadline = time.monotonic() + seconds
    while not daemon.stop_requested:
        left = deadline - time.monotonic()
        if left <= 0:
            return
        time.sleep(min(SLEEP_SLICE_SECONDS, left))


def _run_loop(daemon: Daemon, request: WatchRequest, until: Callable[[], bool] | None) -> None:
    """The outer loop: iterate, back off when idle, stop when asked or when done."""
    rescanned = False
    errors_in_a_row = 0
    interval = daemon.settings.poll_interval_seconds
    while not daemon.stop_requested:
        try:
            did_work = daemon.loop_once(time.time())
        except SidecarError:  # a base model that does not load: nothing renders until it is fixed
            raise
        except Exception:  # the loop boundary (huey's consumer): log, back off, go on
            errors_in_a_row += 1
            if errors_in_a_row >= MAX_LOOP_ERRORS_IN_A_ROW:
                raise
            logger.exception("the daemon's loop failed (%s in a row); going on", errors_in_a_row)
            _sleep(interval * errors_in_a_row, daemon)
            continue
        errors_in_a_row = 0
        rendered = daemon.dispatcher.rendered_checkpoints
        if request.stop_after is not None and rendered >= request.stop_after:
            logger.info("rendered %s checkpoint(s), as asked; exiting", rendered)
            return
        finishing = request.once or (until is not None and until())
        if finishing and not rescanned and not request.once:
            daemon.intake.rescan()  # an event still in flight must not be missed on the way out
            rescanned = True
            continue
        if finishing and not did_work and daemon.intake.is_settled():
            logger.info("nothing left to do; exiting")
            return
        if not did_work:
            daemon.wait_for_work(interval)
    logger.info("stop requested; the store is consistent, the rest is rendered next time")
