"""Views of a rendered step: its contact sheet, the gallery across steps, TensorBoard images.

Called once a step's images are all on disk, by the daemon and by `sidecar render`.
They only read the sample files, so a failure here never fails a render.

The daemon publishes through a `StepPublisher` on a thread of its own: the render loop
hands the step over and starts the next checkpoint at once, so a grid, a gallery of a
long run or a TensorBoard event never delays the next checkpoint's first image. Steps
that queue up while one is being published go out together, with one gallery rebuild.

A step counts as published once its grid is on disk: TensorBoard first, the grid, then the
gallery (which links the grid). A process killed in between leaves a rendered step
without its grid, and `StepPublisher.catch_up` publishes it at the next start, so each
step reaches TensorBoard once (twice only if killed in the milliseconds between its event
and its grid).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from sidecar.errors import SidecarError
from sidecar.plan.request import SampleRequest
from sidecar.publish.files import step_dir
from sidecar.publish.gallery import INDEX_NAME, STEP_GRID_NAME, build_gallery, find_samples
from sidecar.publish.grids import write_step_grid
from sidecar.publish.tensorboard import TensorBoardSink
from sidecar.settings import SamplesFolder

logger = logging.getLogger("sidecar.publish")

CLOSE_SECONDS = 120.0  # a stopping daemon waits this long for queued steps; the rest, next start


def publish_step(
    samples_dir: Path,
    step: int,
    requests: Sequence[SampleRequest],
    *,
    tensorboard: TensorBoardSink | None = None,
) -> None:
    """After a step's images are all on disk: TensorBoard, its contact sheet, the gallery."""
    _publish_one(samples_dir, step, requests, tensorboard)
    build_gallery(samples_dir)


def _publish_one(
    samples_dir: Path, step: int, requests: Sequence[SampleRequest], tensorboard: TensorBoardSink | None
) -> None:
    """TensorBoard, then the grid: the grid on disk marks the step published."""
    if tensorboard is not None:
        on_disk = find_samples(samples_dir).get(step, {})
        tensorboard.add_samples(step, [(r, on_disk[r.index]) for r in requests if r.index in on_disk])
    write_step_grid(samples_dir, step)  # captions from each image's infotext: what was rendered


def is_published(samples_dir: Path, step: int) -> bool:
    """Whether `step` was published (its grid exists), or has nothing to publish (no folder)."""
    folder = step_dir(samples_dir, step)
    return (folder / STEP_GRID_NAME).is_file() or not folder.is_dir()


@dataclass(frozen=True)
class _Step:
    step: int | None  # None: rebuild the gallery alone
    requests: tuple[SampleRequest, ...] = ()


class StepPublisher:
    """Publishes rendered steps in order, on a thread of its own (`threaded=False`: in the caller).

    `submit` returns at once; `close` publishes what is queued (up to `CLOSE_SECONDS`) and
    stops the thread. The TensorBoard sink is used by this thread only.
    """

    def __init__(
        self, samples_dir: Path, *, tensorboard: TensorBoardSink | None = None, threaded: bool = True
    ) -> None:
        self.samples_dir = Path(samples_dir)
        self.tensorboard = tensorboard
        self.threaded = threaded
        self.published = 0  # steps published by this publisher
        self._queue: queue.Queue[_Step | None] = queue.Queue()  # None: stop
        self._pending = 0  # submitted, not yet published
        self._idle = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False

    def submit(self, step: int, requests: Sequence[SampleRequest]) -> None:
        """Publish `step` (its images all on disk) after the steps submitted before it."""
        self._submit(_Step(step, tuple(requests)))

    def submit_gallery(self) -> None:
        """Rebuild the gallery alone, after the steps submitted before."""
        self._submit(_Step(None))

    def _submit(self, item: _Step) -> None:
        if not self.threaded or self._closed:
            self._publish([item])
            return
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="sidecar-publish", daemon=True)
            self._thread.start()
        with self._idle:
            self._pending += 1
        self._queue.put(item)

    def catch_up(self, missed: Sequence[tuple[int, Sequence[SampleRequest]]]) -> None:
        """Submit the rendered `(step, requests)` a killed process left unpublished (without their
        grid: `is_published`); with none, rebuild a gallery older than the newest grid."""
        for step, requests in missed:
            self.submit(step, requests)
        if missed:
            logger.info("publishing %s rendered step(s) a stopped process left unpublished", len(missed))
        elif self._gallery_stale():
            self.submit_gallery()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until everything submitted is published; False if `timeout` ran out first."""
        with self._idle:
            return self._idle.wait_for(lambda: self._pending == 0, timeout)

    def close(self, timeout: float = CLOSE_SECONDS) -> None:
        """Publish what is queued, then stop the thread; later steps publish in the caller."""
        self._closed = True
        if self._thread is None:
            return
        self._queue.put(None)
        self._thread.join(timeout)
        if self._thread.is_alive():
            logger.warning(
                "publishing did not finish within %.0f s; the steps left are published at the next start",
                timeout,
            )

    def _run(self) -> None:
        stop = False
        while not stop:
            batch = [self._queue.get()]
            while True:  # what queued meanwhile goes out with one gallery rebuild
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            steps = [item for item in batch if item is not None]
            stop = len(steps) < len(batch)
            self._publish(steps)
            with self._idle:
                self._pending -= len(steps)
                self._idle.notify_all()

    def _publish(self, items: Sequence[_Step]) -> None:
        """Each step's TensorBoard images and grid, then the gallery once. Views of files on disk:
        a failure is logged, never raised."""
        if not items:
            return
        for item in items:
            if item.step is None:
                continue
            try:
                _publish_one(self.samples_dir, item.step, item.requests, self.tensorboard)
                self.published += 1
            except (OSError, SidecarError) as error:
                logger.warning("step %s: grid / TensorBoard not updated: %s", item.step, error)
            except Exception:  # a view must never stop the publisher
                logger.exception("step %s: publishing failed", item.step)
        try:
            build_gallery(self.samples_dir)
        except (OSError, SidecarError) as error:
            logger.warning("gallery not updated: %s", error)
        except Exception:
            logger.exception("the gallery failed")

    def _gallery_stale(self) -> bool:
        """The gallery is missing or older than the newest grid (killed between the two)."""
        grids = [folder / STEP_GRID_NAME for folder in SamplesFolder(self.samples_dir).step_dirs().values()]
        newest = max((grid.stat().st_mtime_ns for grid in grids if grid.is_file()), default=None)
        if newest is None:
            return False
        index = self.samples_dir / INDEX_NAME
        return not index.is_file() or index.stat().st_mtime_ns < newest
