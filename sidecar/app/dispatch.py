"""The dispatch loop: claim the next checkpoint, render its samples, publish the step.

One iteration (`loop_once(now)`), driven by tests with fake time and no threads:

1. ask the slot gate whether the card is free; while it is not, park the pipeline;
2. load the base model on first need (a `ModelError` stops the daemon: no checkpoint
   can render until it is fixed), or take the one `preload` began loading on a thread
   while the intake copied and hashed the first checkpoints;
3. claim the next checkpoint (backlog policy), apply its LoRA, render its pending
   samples with the plan stored with it, marking each done as its file lands, then
   close the checkpoint, hand the step to the publisher (grid, gallery, TensorBoard:
   on a thread of its own in the daemon, so the next checkpoint starts at once) and drop
   its cached copy. The first iteration also publishes steps a killed process rendered
   but left unpublished.

A checkpoint whose bytes equal an earlier one's gets its own step all the same: samples
that checkpoint rendered with the same settings become hard links of its images.

Errors: a `SidecarError` in one checkpoint (corrupt, wrong architecture, LoRA that does
not apply) fails that checkpoint with its message; `TransientError` and CUDA out of
memory retry with the store's bounded back-off; a sample that cannot be written (disk
full, I/O error) gives the checkpoint back without spending an attempt and waits, with a
bounded back-off, for writing to work again; anything else is logged with its
traceback and fails the checkpoint. Signals only set a flag: the render stops after the
current image, done samples stay done, the rest go back to pending.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from sidecar.app.plan_source import PlanSource
from sidecar.app.rendering import RenderedSample, render_samples
from sidecar.app.state import StateFile
from sidecar.errors import SidecarError, TransientError
from sidecar.intake.cache import CheckpointCache
from sidecar.intake.steps import StepCounter
from sidecar.jobs.policy import write_retry_delay_seconds
from sidecar.jobs.records import CheckpointJob, ClaimedCheckpoint, SampleJob
from sidecar.jobs.store import JobStore
from sidecar.publish.files import SampleWriteError, link_sample
from sidecar.publish.step import StepPublisher, is_published
from sidecar.publish.tensorboard import TensorBoardSink
from sidecar.render.slots import SlotGate
from sidecar.settings import Backlog

if TYPE_CHECKING:
    from sidecar.render.base import Renderer

logger = logging.getLogger("sidecar.daemon")

RendererFactory = Callable[[], "Renderer"]


class _SlotTaken(Exception):
    """The slot closed between the gate's answer and the render; the checkpoint waits."""


def _is_cuda_oom(error: BaseException) -> bool:
    from sidecar.render.devices import is_cuda_oom  # torch: only once a render failed

    return is_cuda_oom(error)


def _freeze_heap() -> None:
    """Move what is alive now (the base model's tens of thousands of Python objects, which live as
    long as the process) out of the cyclic garbage collector's reach: otherwise each full
    collection walks them all, a 0.3-0.5 s pause every few seconds of rendering on a deep model."""
    gc.collect()
    gc.freeze()


class _Preload:
    """The base model loading on a thread of its own; `result()` waits for it (or its error)."""

    def __init__(self, factory: RendererFactory) -> None:
        self._factory = factory
        self._renderer: Renderer | None = None
        self._error: BaseException | None = None
        self.started = time.perf_counter()
        self._thread = threading.Thread(target=self._load, name="sidecar-load-base", daemon=True)
        self._thread.start()

    def _load(self) -> None:
        try:
            self._renderer = self._factory()
        except BaseException as error:  # handed to the dispatch loop, which stops on a ModelError
            self._error = error

    def result(self) -> Renderer:
        self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._renderer is not None
        return self._renderer


class Dispatcher:
    """Ready checkpoints in the store -> images on disk, one `loop_once(now)` at a time.

    `take_in(now)` is called after every image (the intake's `loop_once`), so new
    checkpoints are copied aside during a long render. `clock` gives the time between
    two images, where `loop_once`'s `now` would stand still; tests pass a fake one.
    `publisher` publishes each rendered step; by default in this loop (`threaded=False`).
    """

    def __init__(
        self,
        *,
        store: JobStore,
        cache: CheckpointCache,
        samples_dir: Path,
        plans: PlanSource,
        steps: StepCounter,
        renderer_factory: RendererFactory,
        gate: SlotGate,
        backlog: Backlog = "all",
        take_in: Callable[[float], object] = lambda now: None,
        tensorboard: TensorBoardSink | None = None,
        publisher: StepPublisher | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.cache = cache
        self.samples_dir = Path(samples_dir)
        self.plans = plans
        self.steps = steps
        self.renderer_factory = renderer_factory
        self.gate = gate
        self.backlog = backlog
        self.take_in = take_in
        self.tensorboard = tensorboard
        self.publisher = publisher or StepPublisher(self.samples_dir, tensorboard=tensorboard, threaded=False)
        self.clock = clock
        self.state = StateFile(self.samples_dir)
        self.renderer: Renderer | None = None
        self.rendered_checkpoints = 0  # done during this run
        self._stop_requested = False
        self._write_failures = 0  # renders in a row whose samples could not be written (disk full)
        self._preload: _Preload | None = None
        self._caught_up = False  # steps a killed process left unpublished: handed over once

    def request_stop(self) -> None:
        """Stop after the current image. Safe to call from a signal handler: it sets a flag."""
        self._stop_requested = True

    @property
    def stop_requested(self) -> bool:
        return self._stop_requested

    def loop_once(self, now: float) -> bool:
        """Render the next checkpoint if the card is free; True when one was rendered."""
        if self._stop_requested:
            return False
        if not self._caught_up:
            self._catch_up()
        gate = self.gate.wait_state(now)
        if not gate.is_open:
            self.state.set(f"waiting for a slot: {gate.reason}")
            self._park()
            return False
        if self.renderer is None:
            if not self.store.queue():
                self.state.set("idle")
                return False
            self.state.set("loading the base model")
            preload, self._preload = self._preload, None
            started = preload.started if preload is not None else time.perf_counter()
            # ModelError stops the daemon
            self.renderer = preload.result() if preload is not None else self.renderer_factory()
            logger.info("base model ready in %.1f s", time.perf_counter() - started)
            _freeze_heap()
        claimed = self.store.claim_next_checkpoint(now, backlog=self.backlog)
        if claimed is None:
            self.state.set("idle")
            if not self.gate.always_open:
                self._park()  # a shared card: hold no VRAM between renders, the trainer may start
            return False
        self.renderer.unpark()
        self._render(claimed)
        return True

    def preload(self) -> None:
        """Start loading the base model on a thread, when work is coming (the intake saw new
        checkpoints) and the card is the daemon's own: loading overlaps the copy and hashing of
        those checkpoints and their settling. On a card shared with the trainer it loads once the
        slot is free, as before."""
        if self.renderer is None and self._preload is None and self.gate.always_open:
            logger.info("loading the base model while the new checkpoints are taken in")
            self._preload = _Preload(self.renderer_factory)

    def close(self) -> None:
        """Publish the steps still queued, then write the final state for `sidecar status`."""
        self.publisher.close()
        self.state.set("stopped")
        if self.renderer is not None:
            gc.unfreeze()  # `_freeze_heap`'s objects: collectable again once the daemon lets go

    def _catch_up(self) -> None:
        """Steps rendered by a process killed before it published them: published now."""
        self._caught_up = True
        done = self.store.checkpoints(states=["done"])
        steps = [
            (job.step, [sample.request for sample in self.store.samples(job.id)])
            for job in done
            if job.step is not None and not is_published(self.samples_dir, job.step)
        ]
        self.publisher.catch_up(steps)

    def _park(self) -> None:
        if self.renderer is not None:
            self.renderer.park()

    def _should_pause(self) -> bool:
        """Asked after every image: take in new checkpoints, then stop for a signal or a closed slot."""
        now = self.clock()
        try:
            self.take_in(now)
        except Exception:  # taking in must never break a render
            logger.exception("taking in checkpoints between two images failed")
        if self._stop_requested:
            return True
        return not self.gate.wait_state(now, in_checkpoint=True).is_open

    def _render(self, claimed: ClaimedCheckpoint) -> None:
        job = claimed.checkpoint
        renderer = self.renderer
        assert renderer is not None
        step = job.step if job.step is not None else self.steps.next_unknown()
        output = job.output or self.plans.plan.output_options()  # rows from before v2 stored none
        self.state.set(f"rendering step {step}")
        pending = {sample.request.index: sample for sample in claimed.samples}
        to_render = self._link_identical(job, step, claimed.samples)
        done = len(claimed.samples) - len(to_render)
        started = time.perf_counter()

        def on_sample(rendered: RenderedSample) -> None:
            nonlocal done
            sample = pending.get(rendered.request.index)
            if sample is not None:
                self.store.mark_sample_done(sample.id, output_path=rendered.paths.image, now=self.clock())
                done += 1

        try:
            if to_render:
                with contextlib.ExitStack() as stack:
                    self._hold_slot(stack)
                    renderer.apply_lora(self.cache.source_of(job.content_hash, job.path))
                    render_samples(
                        renderer,
                        [sample.request for sample in to_render],
                        samples_dir=self.samples_dir,
                        step=step,
                        image_format=output["image_format"],
                        batch_size=output["batch_size"],
                        should_stop=self._should_pause,
                        on_sample=on_sample,
                    )
        except _SlotTaken as error:  # no fault of the checkpoint: back to pending, no attempt spent
            self.store.release_claim(job.id, now=self.clock())
            self.state.set(f"waiting for a slot: {error}")
            return
        except SampleWriteError as error:  # disk full, I/O error: wait for it to pass, no attempt spent
            self._wait_to_write(job, step, error)
            return
        except TransientError as error:
            self._fail(job, str(error), transient=True)
            return
        except SidecarError as error:
            self._fail(job, str(error), transient=False)
            return
        except Exception as error:
            if _is_cuda_oom(error):
                self._fail(job, f"out of memory: {str(error).splitlines()[0]}", transient=True)
                return
            logger.exception("step %s (%s): unexpected error", step, job.path)
            self._fail(job, f"{type(error).__name__}: {error} (unexpected; see the log)", transient=False)
            return
        self._write_failures = 0
        finished = self.store.finish_checkpoint(job.id, now=self.clock())
        seconds = time.perf_counter() - started
        if finished.state == "done":
            self.rendered_checkpoints += 1
            logger.info("rendered %s image(s) of step %s in %.1f s", done, step, seconds)
            self._publish(job, step)
        elif finished.state == "failed":
            logger.warning("step %s failed: %s", step, finished.error)
        else:
            logger.info(
                "paused step %s after %s of %s image(s); the rest follow", step, done, len(claimed.samples)
            )
        if finished.state in ("done", "failed") and job.content_hash:
            self._drop_copy(job.content_hash)

    def _link_identical(self, job: CheckpointJob, step: int, samples: Sequence[SampleJob]) -> list[SampleJob]:
        """Samples another checkpoint with the same bytes rendered with the same settings become hard
        links of its images (never merged away: this step gets its own files, with a note); returns
        the samples still to render."""
        identical = self.store.identical_done_samples(job.id)
        left: list[SampleJob] = []
        linked: list[Path] = []
        for sample in samples:
            source = identical.get(sample.request.index)
            paths = None
            if source is not None:
                note = (
                    f"the checkpoint of step {step} has the same bytes as that of {source.parent.name}; "
                    f"this image is a hard link of {source.parent.name}/{source.name}, not rendered again"
                )
                try:
                    paths = link_sample(self.samples_dir, step, sample.request, source, note=note)
                except (OSError, SidecarError) as error:
                    logger.warning("step %s: cannot link %s (%s); rendering it", step, source, error)
            if paths is None:
                left.append(sample)
                continue
            self.store.mark_sample_done(sample.id, output_path=paths.image, now=self.clock())
            linked.append(source)  # type: ignore[arg-type]
        if linked:
            sources = sorted({path.parent.name for path in linked})
            logger.info(
                "step %s (%s): same checkpoint bytes as %s; %s image(s) are hard links of its images",
                step,
                job.path,
                ", ".join(sources),
                len(linked),
            )
        return left

    def _wait_to_write(self, job: CheckpointJob, step: int, error: SampleWriteError) -> None:
        """Samples cannot be written (disk full, I/O error): give the checkpoint back and wait, longer
        each time up to a bound; what was written stays, the rest is rendered once writing works."""
        self._write_failures += 1
        delay = write_retry_delay_seconds(self._write_failures)
        now = self.clock()
        self.store.release_claim(job.id, now=now, retry_at=now + delay, reason=f"waiting to write: {error}")
        self.state.set(f"cannot write samples, trying again in {delay:.0f} s: {error}")
        logger.warning("step %s: %s; trying again in %.0f s", step, error, delay)

    def _drop_copy(self, content_hash: str) -> None:
        """Drop a cached copy once no checkpoint still to render has those bytes."""
        if not self.store.content_needed(content_hash):
            self.cache.drop(content_hash)

    def _publish(self, job: CheckpointJob, step: int) -> None:
        """Step grid, gallery, TensorBoard, from the plan stored with the checkpoint, handed to the
        publisher. Views of files already on disk: their failure fails no job."""
        self.publisher.submit(step, [sample.request for sample in self.store.samples(job.id)])

    def _hold_slot(self, stack: contextlib.ExitStack) -> None:
        """Hold the slot for the render (a lock shared with the trainer, where the probe has one)."""
        try:
            stack.enter_context(self.gate.hold())
        except TransientError as error:  # sidecar.render.slots.SlotClosedError: the trainer took it first
            raise _SlotTaken(str(error)) from error

    def _fail(self, job: CheckpointJob, message: str, *, transient: bool) -> None:
        state = self.store.mark_checkpoint_failed(job.id, message, transient=transient, now=self.clock())
        if state == "failed":
            logger.warning("step %s failed: %s", job.step, message)
            if job.content_hash:
                self._drop_copy(job.content_hash)
        else:
            logger.warning("step %s will be retried: %s", job.step, message)
