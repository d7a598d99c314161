"""The daemon: watch a trainer's output, render each checkpoint exactly once, survive anything.

The shape is huey's consumer: a `Worker` exposes one iteration, `loop_once(now)`, which
tests drive with fake time and no threads; `run_daemon` wraps it in the watcher, the job
store, signal handling and an idle back-off. One iteration:

1. reload the trainer config if its file changed (a bad edit is logged, the old plan kept);
2. drain the watcher's queue into the `ReadinessTracker`;
3. act on the tracker's verdicts: a *ready* checkpoint is copied at once into a private
   cache (`SAMPLES_DIR/.sidecar/cache/<sha256>/<name>`) while hashing it, then added to the
   `JobStore`; *vanished* and *abandoned* ones are recorded as failed with the reason;
4. claim the next checkpoint (backlog policy), apply its LoRA, render its pending samples,
   marking each one done as its file lands, then close the checkpoint and drop its copy.

Decisions:

- Pruned checkpoints. Trainers delete old checkpoints (ai-toolkit
  `max_step_saves_to_keep`), possibly before sidecar gets to render them, so a checkpoint
  is copied into the cache the moment it is whole, and rendered from the copy. LoRA files
  are small next to a base model, and a copy (unlike an open handle) survives a restart.
  Ready checkpoints are also taken in between two images of a render, so a slow render
  does not let the trainer prune the next one unseen. A checkpoint that disappears before
  it was ever whole is recorded once as `vanished`.
- The step of a checkpoint whose name has none (a final `{name}.safetensors`) comes from
  its header metadata (`resolve_step`); failing that it is one past the highest step
  recorded or seen so far, and 1 when none is known (step 0 is `sidecar render
  --baseline`, the base model alone). The step is stored with the job, so a restart
  does not move it.
- A copy is checked against the file's size and mtime before and after copying: a trainer
  rewriting the file meanwhile sends it back to the tracker instead of into the store.
- Errors: a `SidecarError` in one checkpoint (corrupt, wrong architecture, LoRA that does
  not apply) fails that checkpoint with its message; `TransientError` and CUDA out of
  memory retry with the store's bounded back-off; anything else is logged with its
  traceback and fails the checkpoint. The base model failing to load (`ModelError`) is not
  one checkpoint's fault and stops the daemon.
- Signals only set a flag. The render stops after the current image; done samples stay
  done, the rest go back to pending, so the store is consistent at any stop (and after
  `kill -9` the store's owner lock lets the next start recover the claim).
- One daemon per samples folder: a lock file refuses a second one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import os
import queue
import re
import shutil
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from sidecar.checkpoints import (
    ABANDON_SECONDS,
    SETTLE_SECONDS,
    Checkpoint,
    ReadinessTracker,
    ReadyEvent,
    completeness,
    resolve_step,
    step_from_metadata,
)
from sidecar.config import TrainerConfig, load_trainer_config
from sidecar.errors import SidecarError, TransientError
from sidecar.jobs import CheckpointJob, ClaimedCheckpoint, JobStore
from sidecar.output import remove_stale_temp_files
from sidecar.prompts import SamplePlan, build_plan
from sidecar.publish import publish_step
from sidecar.slots import SlotGate, build_probe
from sidecar.status import JOBS_FILE_NAME, state_dir, write_state_file
from sidecar.tensorboard import TensorBoardSink, tensorboard_dir_for
from sidecar.watcher import CheckpointWatcher, FileEvent, scan_tree

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

logger = logging.getLogger("sidecar.daemon")

Backlog = Literal["all", "latest"]

POLL_INTERVAL_SECONDS = 1.0  # idle back-off of the outer loop
SLEEP_SLICE_SECONDS = 0.1  # the idle sleep is cut in slices so a stop flag is seen quickly
SETTLE_CHECKS = 5  # while a file settles, look at it this many times per settle time
MIN_WAIT_SECONDS = 0.01
COPY_CHUNK_BYTES = 4 * 1024 * 1024
MAX_LOOP_ERRORS_IN_A_ROW = 10  # the loop itself failing this often (a broken store): give up
MAX_COPY_FAILURES = 3  # unreadable (permissions, I/O errors) this often: recorded failed
CACHE_DIR_NAME = "cache"
LOCK_FILE_NAME = "daemon.lock"
FIRST_STEP_WITHOUT_HISTORY = 1  # step 0 is the baseline render of the base model alone

EXIT_OK = 0
EXIT_FAILED = 1  # `once`: a checkpoint failed during this run


@dataclass(frozen=True)
class DaemonSettings:
    """Everything `sidecar watch` needs; None means "from the config's `sidecar:` section"."""

    output_dir: Path
    config_path: Path
    process: int | str | None = None
    prompts_file: Path | None = None
    samples_dir: Path | None = None  # default: config `sidecar.output`, else OUTPUT_DIR/samples
    device: str | None = None  # e.g. "cuda:1", "cpu"
    dtype: str | None = None
    offload: str | None = None
    backlog: Backlog | None = None  # default: config `sidecar.backlog` ("all")
    pattern: str | None = None
    settle_seconds: float = SETTLE_SECONDS
    abandon_seconds: float = ABANDON_SECONDS
    poll_interval_seconds: float = POLL_INTERVAL_SECONDS
    use_polling_observer: bool = False
    once: bool = False  # exit when nothing is left to do after the startup scan
    stop_after: int | None = None  # exit after rendering this many checkpoints
    share_gpu: int | None = None  # one-GPU box: render on cuda:N only in the trainer's free slots
    slot_file: Path | None = None  # a file the trainer's hooks drive (see sidecar.slots.FileProbe)
    slot_file_mode: str = "exists"  # exists | absent | lock
    tensorboard: Path | None = None  # write samples as TensorBoard images into this folder

    def __post_init__(self) -> None:
        for name in ("output_dir", "config_path", "prompts_file", "samples_dir", "slot_file", "tensorboard"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, Path):
                object.__setattr__(self, name, Path(value))
        if self.settle_seconds < 0:
            raise ValueError(f"`settle_seconds` must be >= 0, got {self.settle_seconds!r}")
        if self.abandon_seconds <= self.settle_seconds:
            raise ValueError(
                f"`abandon_seconds` must exceed `settle_seconds` ({self.settle_seconds}), "
                f"got {self.abandon_seconds!r}"
            )
        if self.poll_interval_seconds <= 0:
            raise ValueError(f"`poll_interval_seconds` must be > 0, got {self.poll_interval_seconds!r}")
        if self.stop_after is not None and self.stop_after < 1:
            raise ValueError(f"`stop_after` must be a positive integer or None, got {self.stop_after!r}")


class SlotStateLike(Protocol):
    is_open: bool
    reason: str


class SlotGateLike(Protocol):
    """The narrow seam to `sidecar.slots.SlotGate`: may a render start now, and why not.

    It is asked before each checkpoint and after each image. A gate that also has
    `hold()` (a context manager; `TransientError` when the slot is taken meanwhile) holds
    the slot for each checkpoint's render.
    """

    def wait_state(self, now: float, *, in_checkpoint: bool = False) -> SlotStateLike: ...


@dataclass(frozen=True)
class _Open:
    is_open: bool = True
    reason: str = "a GPU of its own"


class AlwaysOpenGate:
    """The default gate: the card is ours alone, rendering may always start."""

    def wait_state(self, now: float, *, in_checkpoint: bool = False) -> SlotStateLike:
        return _Open()


RendererFactory = Callable[[TrainerConfig], Any]  # returns a sidecar.pipelines.Renderer


class _SlotTaken(Exception):
    """The slot closed between the gate's answer and the render; the checkpoint waits."""


class _ChangedWhileCopying(Exception):
    """The trainer rewrote the file while it was being copied: it goes back to the tracker."""


def _signature(path: Path) -> tuple[int, int] | None:
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_size, stat.st_mtime_ns


def _step_order(verdict: ReadyEvent) -> tuple[bool, int, str]:
    """Checkpoints with a step (in the name, else in the metadata) first, so that a final
    without any step is placed after all of them."""
    checkpoint = verdict.checkpoint
    step = checkpoint.step
    if step is None and verdict.state == "ready" and not checkpoint.is_pickle:
        try:
            step = step_from_metadata(checkpoint.path)
        except (SidecarError, OSError):
            step = None
    return step is None, step or 0, str(checkpoint.path)


def _describe(checkpoint: Checkpoint) -> str:
    step = "no step in its name" if checkpoint.step is None else f"step {checkpoint.step}"
    return f"{checkpoint.path} ({checkpoint.layout}, {step})"


class Worker:
    """One iteration of the daemon at a time (`loop_once`); no threads, no sleeps.

    `clock` gives the time used between two images of a render, where `loop_once`'s
    `now` would stand still; tests pass a fake one.
    """

    def __init__(
        self,
        *,
        settings: DaemonSettings,
        config: TrainerConfig,
        plan: SamplePlan,
        store: JobStore,
        events: queue.Queue[FileEvent],
        samples_dir: Path,
        backlog: Backlog = "all",
        pattern: re.Pattern[str] | None = None,
        renderer_factory: RendererFactory,
        slot_gate: SlotGateLike | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.config = config
        self.plan = plan
        self.store = store
        self.events = events
        self.samples_dir = Path(samples_dir)
        self.backlog = backlog
        self.pattern = pattern
        self.renderer_factory = renderer_factory
        self.slot_gate: SlotGateLike = slot_gate or AlwaysOpenGate()
        self.tensorboard: TensorBoardSink | None = None  # set by run_daemon with --tensorboard
        self.clock = clock
        self.tracker = ReadinessTracker(
            settle_seconds=settings.settle_seconds, abandon_seconds=settings.abandon_seconds
        )
        self.cache_dir = state_dir(self.samples_dir) / CACHE_DIR_NAME
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self.renderer: Any = None
        self.rendered_checkpoints = 0  # done during this run
        self.failed_checkpoints = 0  # failed during this run
        self._stop_requested = False
        self._tracking: set[Path] = set()
        self._copy_failures: dict[Path, int] = {}
        self._known: dict[Path, tuple[int, int]] = {}  # path -> (size, mtime_ns) already recorded
        self._highest_step: int | None = None
        self._state_text = ""
        self._config_signature = self._watched_config_signature()
        for job in store.checkpoints():
            if job.content_hash is not None and job.size_bytes is not None and job.mtime_ns is not None:
                self._known[job.path] = (job.size_bytes, job.mtime_ns)
            self._note_step(job.step)
        self._clean_cache()

    # --- control ----------------------------------------------------------------------

    def request_stop(self) -> None:
        """Stop after the current image. Safe to call from a signal handler: it sets a flag."""
        self._stop_requested = True

    @property
    def stop_requested(self) -> bool:
        return self._stop_requested

    def is_settled(self) -> bool:
        """Nothing waits in the event queue or the readiness tracker."""
        return self.events.empty() and not self._tracking

    def loop_once(self, now: float) -> bool:
        """One iteration; True when it did anything (saw events, recorded or rendered)."""
        did_work = self._reload_config_if_changed()
        did_work |= self._take_in(now)
        if self._stop_requested:
            return did_work
        return self._render_next(now) or did_work

    def wait_for_work(self, seconds: float) -> None:
        """The idle back-off: ends as soon as the watcher has news, a stop is asked, or
        (while files are settling) soon enough to see them settle.

        Waits on the event queue's own condition, looking at `queue` directly: `qsize()`
        takes the same lock and would deadlock here.
        """
        if self._tracking:
            seconds = min(seconds, max(self.settings.settle_seconds / SETTLE_CHECKS, MIN_WAIT_SECONDS))
        deadline = time.monotonic() + seconds
        with self.events.not_empty:
            while not self.events.queue and not self._stop_requested:
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                self.events.not_empty.wait(min(left, SLEEP_SLICE_SECONDS))

    def rescan(self) -> int:
        """Feed every checkpoint under the output folder in again (sure to miss nothing)."""
        count = 0
        for event in scan_tree(self.settings.output_dir, root=self.settings.output_dir, pattern=self.pattern):
            self.events.put(event)
            count += 1
        return count

    def close(self) -> None:
        """Write the final state for `sidecar status`."""
        self._set_state("stopped")

    # --- config -----------------------------------------------------------------------

    def _watched_config_signature(self) -> tuple[int | None, ...]:
        files = [self.settings.config_path]
        if self.settings.prompts_file is not None:
            files.append(self.settings.prompts_file)
        return tuple((_signature(path) or (None, None))[1] for path in files)

    def _reload_config_if_changed(self) -> bool:
        """A changed `sample:` section applies to checkpoints added from now on."""
        signature = self._watched_config_signature()
        if signature == self._config_signature:
            return False
        self._config_signature = signature
        try:
            config = load_trainer_config(self.settings.config_path, process=self.settings.process)
            plan = build_plan(config, prompts_file=self.settings.prompts_file)
        except SidecarError as error:
            logger.error("config changed but is not valid, keeping the previous sample plan: %s", error)
            return True
        if (config.arch, config.model.name_or_path) != (self.config.arch, self.config.model.name_or_path):
            logger.warning(
                "config now names base model %s (%s); the loaded %s stays until sidecar restarts",
                config.model.name_or_path,
                config.arch,
                self.config.model.name_or_path,
            )
        self.config, self.plan = config, plan
        logger.info(
            "config reloaded: %s sample(s) per checkpoint, for checkpoints added from now on",
            len(plan.requests),
        )
        return True

    # --- taking checkpoints in --------------------------------------------------------

    def _take_in(self, now: float) -> bool:
        """Drain the event queue into the tracker, then act on the tracker's verdicts."""
        did_work = False
        while True:
            try:
                event = self.events.get_nowait()
            except queue.Empty:
                break
            did_work = True
            self._handle_event(event, now)
        verdicts = self.tracker.poll(now) if self._tracking else []
        verdicts.sort(key=_step_order)
        for verdict in verdicts:
            did_work = True
            self._tracking.discard(verdict.checkpoint.path)
            try:
                if verdict.state == "ready":
                    self._ingest(verdict, now)
                elif verdict.state == "vanished":
                    self._record_vanished(verdict, now)
                else:
                    self._record_failed(verdict.checkpoint, verdict.reason, now)
            except Exception:  # one file must not stop the daemon
                logger.exception("could not record %s", verdict.checkpoint.path)
        return did_work

    def _handle_event(self, event: FileEvent, now: float) -> None:
        if event.is_directory:
            if event.kind in ("created", "moved") and event.path.is_dir():
                root, pattern = self.settings.output_dir, self.pattern
                for found in scan_tree(event.path, root=root, pattern=pattern):
                    self._observe(found.checkpoint, now)  # type: ignore[arg-type]
            return
        if event.kind == "deleted" or event.checkpoint is None:
            return  # a tracked file that is gone is reported by the tracker
        self._observe(event.checkpoint, now)

    def _observe(self, checkpoint: Checkpoint, now: float) -> None:
        path = checkpoint.path
        if path not in self._tracking:
            known = self._known.get(path)
            if known is not None and known == _signature(path):
                return  # already recorded with this content (startup scan, late event)
            self._tracking.add(path)
            self._note_step(checkpoint.step)
            logger.info("seen %s", _describe(checkpoint))
        self.tracker.observe(checkpoint, now)

    def _note_step(self, step: int | None) -> None:
        if step is not None and (self._highest_step is None or step > self._highest_step):
            self._highest_step = step

    def _next_unknown_step(self) -> int:
        return FIRST_STEP_WITHOUT_HISTORY if self._highest_step is None else self._highest_step + 1

    def _with_step(self, checkpoint: Checkpoint, *, header_of: Path | None) -> Checkpoint:
        """The checkpoint with a step: from its name, its metadata (`header_of`), else the rule."""
        if checkpoint.step is None and header_of is not None and not checkpoint.is_pickle:
            resolved = resolve_step(dataclasses.replace(checkpoint, path=header_of))
            checkpoint = dataclasses.replace(resolved, path=checkpoint.path)
        if checkpoint.step is None:
            step = self._next_unknown_step()
            logger.info(
                "%s has no step in its name or metadata; using %s, one past the highest step seen",
                checkpoint.path,
                step,
            )
            checkpoint = dataclasses.replace(checkpoint, step=step)
        self._note_step(checkpoint.step)
        return checkpoint

    def _ingest(self, verdict: ReadyEvent, now: float) -> None:
        """Copy a whole checkpoint into the cache and add it to the store, before it can be pruned."""
        checkpoint = verdict.checkpoint
        if checkpoint.is_pickle:
            self._record_failed(checkpoint, checkpoint.pickle_message, now)
            return
        try:
            copy, digest, size, mtime_ns = self._copy_to_cache(
                checkpoint.path, (verdict.size, verdict.mtime_ns)
            )
        except FileNotFoundError:
            self._record_vanished(
                dataclasses.replace(verdict, reason="vanished while it was being read (pruned?)"), now
            )
            return
        except _ChangedWhileCopying:
            logger.info("%s changed while it was being copied; waiting for it to settle", checkpoint.path)
            self._observe(checkpoint, now)
            return
        except OSError as error:
            failures = self._copy_failures.get(checkpoint.path, 0) + 1
            self._copy_failures[checkpoint.path] = failures
            if failures >= MAX_COPY_FAILURES:
                self._record_failed(checkpoint, f"cannot be read ({failures} tries): {error}", now)
            else:
                logger.warning("%s cannot be read yet (%s); trying again", checkpoint.path, error)
                self._observe(checkpoint, now)
            return
        self._copy_failures.pop(checkpoint.path, None)
        try:
            checkpoint = self._with_step(checkpoint, header_of=copy)
        except SidecarError as error:
            shutil.rmtree(copy.parent, ignore_errors=True)
            self._record_failed(checkpoint, str(error), now)
            return
        job = self.store.add_checkpoint(
            checkpoint,
            content_hash=digest,
            size_bytes=size,
            mtime_ns=mtime_ns,
            requests=self.plan.requests,
            now=now,
            sample_every=self.plan.sample_every,
        )
        self._known[checkpoint.path] = (size, mtime_ns)
        if job.state not in ("pending", "running"):
            self._drop_copy(digest)

    def _copy_to_cache(self, path: Path, expected: tuple[int, int]) -> tuple[Path, str, int, int]:
        """Copy `path` into `cache/<sha256>/<name>`, hashing as it goes; returns (copy, hash, size, mtime_ns).

        The file must still be what the tracker judged whole (`expected` size and mtime)
        and must not change while it is copied; it may be deleted meanwhile (the open
        handle still reads it whole).
        """
        temporary = self.cache_dir / f".{uuid.uuid4().hex}.partial"
        digest = hashlib.sha256()
        copied = 0
        try:
            with path.open("rb") as source:
                before = os.fstat(source.fileno())
                if (before.st_size, before.st_mtime_ns) != expected:
                    raise _ChangedWhileCopying(path)
                with temporary.open("wb") as target:
                    while chunk := source.read(COPY_CHUNK_BYTES):
                        digest.update(chunk)
                        target.write(chunk)
                        copied += len(chunk)
                after = os.fstat(source.fileno())
            if copied != before.st_size or (after.st_size, after.st_mtime_ns) != expected:
                raise _ChangedWhileCopying(path)
            if not completeness(temporary).whole:
                raise _ChangedWhileCopying(path)
            folder = self.cache_dir / digest.hexdigest()
            folder.mkdir(exist_ok=True)
            copy = folder / path.name
            os.replace(temporary, copy)
        finally:
            with contextlib.suppress(FileNotFoundError):
                temporary.unlink()
        return copy, digest.hexdigest(), before.st_size, before.st_mtime_ns

    def _record_vanished(self, verdict: ReadyEvent, now: float) -> None:
        checkpoint = verdict.checkpoint
        if checkpoint.path in self._known:
            logger.info("%s is gone; it was already copied, nothing is lost", checkpoint.path)
            return
        job = self.store.record_vanished(checkpoint, now=now, reason=verdict.reason)
        if job.state == "failed":
            self.failed_checkpoints += 1

    def _record_failed(self, checkpoint: Checkpoint, reason: str, now: float) -> None:
        """A checkpoint that can never be rendered (truncated for good, pickle, unreadable).

        Its identity is a hash of its path and bytes: two empty or truncated files must not
        be taken for one. A later good write of the same path and step resets the row.
        """
        checkpoint = self._with_step(checkpoint, header_of=None)
        digest = hashlib.sha256(f"unusable\0{checkpoint.path}\0".encode())
        try:
            with checkpoint.path.open("rb") as handle:
                stat = os.fstat(handle.fileno())
                while chunk := handle.read(COPY_CHUNK_BYTES):
                    digest.update(chunk)
        except FileNotFoundError:
            job = self.store.record_vanished(checkpoint, now=now, reason=f"{reason}; then it vanished")
            self.failed_checkpoints += int(job.state == "failed")
            return
        except OSError:
            stat = None
        job = self.store.add_checkpoint(
            checkpoint,
            content_hash=digest.hexdigest(),
            size_bytes=stat.st_size if stat else -1,
            mtime_ns=stat.st_mtime_ns if stat else -1,
            requests=(),
            now=now,
        )
        if stat is not None:
            self._known[checkpoint.path] = (stat.st_size, stat.st_mtime_ns)
        if job.state in ("pending", "running"):
            self.store.mark_checkpoint_failed(job.id, reason, transient=False, now=now)
            self.failed_checkpoints += 1
            logger.warning("%s failed: %s", _describe(checkpoint), reason)

    # --- rendering ----------------------------------------------------------------------

    def _render_next(self, now: float) -> bool:
        gate = self.slot_gate.wait_state(now)
        if not gate.is_open:
            self._set_state(f"waiting for a slot: {gate.reason}")
            self._park()
            return False
        if self.renderer is None:
            if not self.store.queue():
                self._set_state("idle")
                return False
            self._set_state("loading the base model")
            started = time.perf_counter()
            self.renderer = self.renderer_factory(self.config)  # ModelError stops the daemon
            logger.info("base model ready in %.1f s", time.perf_counter() - started)
        claimed = self.store.claim_next_checkpoint(now, backlog=self.backlog)
        if claimed is None:
            self._set_state("idle")
            if not isinstance(self.slot_gate, AlwaysOpenGate):
                self._park()  # a shared card: hold no VRAM between renders, the trainer may start
            return False
        placement = getattr(self.renderer, "placement", None)
        if placement is not None:
            placement.unpark(self.renderer.pipe)
        self._render(claimed, now)
        return True

    def _park(self) -> None:
        """The slot closed: hold no VRAM until it opens again (a no-op on the CPU)."""
        placement = getattr(self.renderer, "placement", None)
        if placement is not None:
            placement.park(self.renderer.pipe)

    def _should_pause(self) -> bool:
        """Asked after every image: take in new checkpoints, then stop for a signal or a closed slot."""
        now = self.clock()
        try:
            self._take_in(now)
        except Exception:  # taking in must never break a render
            logger.exception("taking in checkpoints between two images failed")
        if self._stop_requested:
            return True
        return not self.slot_gate.wait_state(now, in_checkpoint=True).is_open

    def _render(self, claimed: ClaimedCheckpoint, now: float) -> None:
        from sidecar.devices import is_cuda_oom  # torch, like the rendering itself
        from sidecar.sampling import render_samples  # torch and diffusers, only once there is work

        job = claimed.checkpoint
        step = job.step if job.step is not None else self._next_unknown_step()
        self._set_state(f"rendering step {step}")
        pending = {sample.request.index: sample for sample in claimed.samples}
        done = 0
        started = time.perf_counter()

        def on_sample(rendered: Any) -> None:
            nonlocal done
            sample = pending.get(rendered.request.index)
            if sample is not None:
                self.store.mark_sample_done(sample.id, output_path=rendered.paths.image, now=self.clock())
                done += 1

        try:
            with contextlib.ExitStack() as stack:
                self._hold_slot(stack)
                self.renderer.apply_lora(self._source_of(job))
                render_samples(
                    self.renderer,
                    [sample.request for sample in claimed.samples],
                    samples_dir=self.samples_dir,
                    step=step,
                    image_format=self.plan.image_format,
                    batch_size=self.plan.batch_size,
                    should_stop=self._should_pause,
                    on_sample=on_sample,
                )
        except _SlotTaken as error:  # no fault of the checkpoint: back to pending, untouched
            self.store.finish_checkpoint(job.id, now=self.clock())
            self._set_state(f"waiting for a slot: {error}")
            return
        except TransientError as error:
            self._fail(job, str(error), transient=True)
            return
        except SidecarError as error:
            self._fail(job, str(error), transient=False)
            return
        except Exception as error:
            if is_cuda_oom(error):
                self._fail(job, f"out of memory: {str(error).splitlines()[0]}", transient=True)
                return
            logger.exception("step %s (%s): unexpected error", step, job.path)
            self._fail(job, f"{type(error).__name__}: {error} (unexpected; see the log)", transient=False)
            return
        finished = self.store.finish_checkpoint(job.id, now=self.clock())
        seconds = time.perf_counter() - started
        if finished.state == "done":
            self.rendered_checkpoints += 1
            logger.info("rendered %s image(s) of step %s in %.1f s", done, step, seconds)
            self._publish(step)
        elif finished.state == "failed":
            self.failed_checkpoints += 1
            logger.warning("step %s failed: %s", step, finished.error)
        else:
            logger.info(
                "paused step %s after %s of %s image(s); the rest follow", step, done, len(claimed.samples)
            )
        if finished.state in ("done", "failed") and job.content_hash:
            self._drop_copy(job.content_hash)

    def _publish(self, step: int) -> None:
        """Step grid, gallery, TensorBoard: views of files already on disk; their failure fails no job."""
        try:
            publish_step(self.samples_dir, step, self.plan.requests, tensorboard=self.tensorboard)
        except (OSError, SidecarError) as error:
            logger.warning("step %s: grid / gallery / TensorBoard not updated: %s", step, error)

    def _hold_slot(self, stack: contextlib.ExitStack) -> None:
        """Enter the gate's `hold()` where it has one (a lock shared with the trainer)."""
        hold = getattr(self.slot_gate, "hold", None)
        if hold is None:
            return
        try:
            stack.enter_context(hold())
        except TransientError as error:  # sidecar.slots.SlotClosedError: the trainer took it first
            raise _SlotTaken(str(error)) from error

    def _fail(self, job: CheckpointJob, message: str, *, transient: bool) -> None:
        state = self.store.mark_checkpoint_failed(job.id, message, transient=transient, now=self.clock())
        if state == "failed":
            self.failed_checkpoints += 1
            logger.warning("step %s failed: %s", job.step, message)
            if job.content_hash:
                self._drop_copy(job.content_hash)
        else:
            logger.warning("step %s will be retried: %s", job.step, message)

    def _source_of(self, job: CheckpointJob) -> Path:
        """The cached copy of a job's checkpoint; the original file only if no copy exists."""
        if job.content_hash:
            folder = self.cache_dir / job.content_hash
            preferred = folder / job.path.name
            if preferred.is_file():
                return preferred
            copies = sorted(folder.glob("*")) if folder.is_dir() else []
            if copies:
                return copies[0]
        if job.path.is_file():
            return job.path
        raise SidecarError(f"{job.path}: vanished, and no copy of it was kept (pruned by the trainer?)")

    # --- the cache and the state file -----------------------------------------------------

    def _drop_copy(self, digest: str) -> None:
        shutil.rmtree(self.cache_dir / digest, ignore_errors=True)

    def _clean_cache(self) -> None:
        """Drop copies no pending job needs, and partial copies a killed process left."""
        needed = {job.content_hash for job in self.store.queue() if job.content_hash}
        for entry in self.cache_dir.iterdir():
            if entry.name not in needed:
                if entry.is_dir():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    with contextlib.suppress(FileNotFoundError):
                        entry.unlink()

    def _set_state(self, text: str) -> None:
        """Record what the daemon is doing, for `sidecar status`; written only when it changes."""
        if text == self._state_text:
            return
        self._state_text = text
        write_state_file(self.samples_dir, {"pid": os.getpid(), "state": text, "since": time.time()})


# --- the process --------------------------------------------------------------------------


@contextlib.contextmanager
def _daemon_lock(folder: Path) -> Iterator[None]:
    """Hold `.sidecar/daemon.lock` while running: two daemons on one samples folder would fight."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE_NAME
    with path.open("a+") as handle:
        if fcntl is not None:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                owner = handle.read().strip() or "?"
                raise SidecarError(
                    f"another sidecar daemon (pid {owner}) is already rendering into {folder.parent}; "
                    "stop it first, or give this one another `--output`"
                ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        yield


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


def _default_renderer_factory(settings: DaemonSettings) -> RendererFactory:
    def load(config: TrainerConfig) -> Any:
        from sidecar.sampling import load_renderer

        overrides = {
            "device": settings.device,
            "gpu": settings.share_gpu if settings.device is None else None,  # a shared card is the one used
            "dtype": settings.dtype,
            "offload": settings.offload,
        }
        return load_renderer(config, config.sidecar.merged(**overrides))

    return load


def build_slot_gate(settings: DaemonSettings) -> SlotGateLike:
    """The gate `--share-gpu` / `--slot-file` ask for; always open on a card of its own."""
    if settings.share_gpu is None and settings.slot_file is None:
        return AlwaysOpenGate()
    cuda_uuid = None
    if settings.share_gpu is not None:
        import torch

        if torch.cuda.is_available() and settings.share_gpu < torch.cuda.device_count():
            cuda_uuid = str(torch.cuda.get_device_properties(settings.share_gpu).uuid)
    probe = build_probe(
        share_gpu=settings.share_gpu,
        slot_file=settings.slot_file,
        slot_file_mode=settings.slot_file_mode,  # type: ignore[arg-type]
        cuda_uuid=cuda_uuid,
    )
    return SlotGate(probe)


def _sleep(seconds: float, worker: Worker) -> None:
    """The idle back-off, cut into slices so a stop request is noticed quickly."""
    deadline = time.monotonic() + seconds
    while not worker.stop_requested:
        left = deadline - time.monotonic()
        if left <= 0:
            return
        time.sleep(min(SLEEP_SLICE_SECONDS, left))


def run_daemon(
    settings: DaemonSettings,
    *,
    renderer_factory: RendererFactory | None = None,
    slot_gate: SlotGateLike | None = None,
    until: Callable[[], bool] | None = None,
    worker_ready: Callable[[Worker], None] | None = None,
) -> int:
    """`sidecar watch`: run until stopped (signal, `once`, `stop_after`, or `until()`); exit code.

    `until` is asked between iterations; once it says True the daemon takes a last look at
    the output folder, renders what is left and exits (the demo's simulated trainer uses it).
    `worker_ready` gets the worker once it exists (tests use it to stop a daemon thread).
    Raises `SidecarError` for a bad config or a base model that cannot be loaded.
    """
    config = load_trainer_config(settings.config_path, process=settings.process)
    plan = build_plan(config, prompts_file=settings.prompts_file)
    options = config.sidecar.merged(
        backlog=settings.backlog, pattern=settings.pattern, output=settings.samples_dir
    )
    pattern = re.compile(options.pattern) if options.pattern else None
    output_dir = settings.output_dir.resolve()
    settings = dataclasses.replace(settings, output_dir=output_dir)
    samples_dir = Path(options.output) if options.output is not None else output_dir / "samples"
    if not output_dir.is_dir():
        logger.info("%s does not exist yet; creating it, as the trainer would", output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
    if slot_gate is None:
        slot_gate = build_slot_gate(settings)
    folder = state_dir(samples_dir)
    events: queue.Queue[FileEvent] = queue.Queue()
    with _daemon_lock(folder):
        remove_stale_temp_files(samples_dir)
        with JobStore(folder / JOBS_FILE_NAME, now=time.time()) as store:
            worker = Worker(
                settings=settings,
                config=config,
                plan=plan,
                store=store,
                events=events,
                samples_dir=samples_dir,
                backlog=options.backlog,
                pattern=pattern,
                renderer_factory=renderer_factory or _default_renderer_factory(settings),
                slot_gate=slot_gate,
            )
            tensorboard = tensorboard_dir_for(
                config, samples_dir=samples_dir, option=settings.tensorboard or options.tensorboard
            )
            if tensorboard is not None:
                worker.tensorboard = TensorBoardSink(tensorboard)
                logger.info("samples also go to TensorBoard in %s", tensorboard)
            if worker_ready is not None:
                worker_ready(worker)
            logger.info(
                "rendering %s sample(s) per checkpoint of %s into %s (backlog: %s)",
                len(plan.requests),
                output_dir,
                samples_dir,
                options.backlog,
            )
            watcher = CheckpointWatcher(
                output_dir,
                events,
                pattern=pattern,
                use_polling=settings.use_polling_observer,
                polling_interval_seconds=settings.poll_interval_seconds,
            )
            try:
                watcher.start()
            except OSError as error:  # e.g. the inotify watch limit: polling still works
                logger.warning("filesystem events unavailable (%s); polling instead", error)
                watcher.use_polling = True
                watcher.start()
            try:
                watcher.scan()
                with _stop_on_signals(worker.request_stop):
                    _run_loop(worker, settings, until)
            finally:
                watcher.stop()
                worker.close()
                if worker.tensorboard is not None:
                    worker.tensorboard.close()
    if worker.stop_requested:
        logger.info("stopped cleanly")
    if settings.once and worker.failed_checkpoints:
        return EXIT_FAILED
    return EXIT_OK


def _run_loop(worker: Worker, settings: DaemonSettings, until: Callable[[], bool] | None) -> None:
    """The outer loop: iterate, back off when idle, stop when asked or when done."""
    rescanned = False
    errors_in_a_row = 0
    while not worker.stop_requested:
        try:
            did_work = worker.loop_once(time.time())
        except SidecarError:  # a base model that does not load: nothing renders until it is fixed
            raise
        except Exception:  # the loop boundary (huey's consumer): log, back off, go on
            errors_in_a_row += 1
            if errors_in_a_row >= MAX_LOOP_ERRORS_IN_A_ROW:
                raise
            logger.exception("the daemon's loop failed (%s in a row); going on", errors_in_a_row)
            _sleep(settings.poll_interval_seconds * errors_in_a_row, worker)
            continue
        errors_in_a_row = 0
        if settings.stop_after is not None and worker.rendered_checkpoints >= settings.stop_after:
            logger.info("rendered %s checkpoint(s), as asked; exiting", worker.rendered_checkpoints)
            return
        finishing = settings.once or (until is not None and until())
        if finishing and not rescanned and not settings.once:
            worker.rescan()  # an event still in flight must not be missed on the way out
            rescanned = True
            continue
        if finishing and not did_work and worker.is_settled():
            logger.info("nothing left to do; exiting")
            return
        if not did_work:
            worker.wait_for_work(settings.poll_interval_seconds)
    logger.info("stop requested; the store is consistent, the rest is rendered next time")
