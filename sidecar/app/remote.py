"""The renderer a run's dispatcher sees under `sidecar watch --runs`: it renders on the pool's workers.

`RemoteRenderer` has the part of `sidecar.render.base.Renderer` the dispatcher and
`render_samples` use (`apply_lora`, `render_resilient`, `spec`, `base_model`, `lora`,
`park`/`unpark`), so a run's daemon loop is the daemon's own; only where the pixels are
made changes.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sidecar.app.scheduler import Scheduler, Ticket
from sidecar.app.watch import Daemon
from sidecar.app.worker import BaseSpec, RenderTask, WorkerFailure, chunks, failure_error
from sidecar.arch import ArchSpec, arch_spec
from sidecar.errors import ModelError

if TYPE_CHECKING:
    from PIL import Image

    from sidecar.plan.request import SampleRequest

logger = logging.getLogger("sidecar.coordinator")

WAIT_SLICE_SECONDS = 0.2  # while a render waits for a worker, the run's intake is served this often


@dataclass(frozen=True)
class AppliedLora:
    """What `render_samples` reads of the applied LoRA: its file name, for the image metadata."""

    path: Path


class RemoteRenderer:
    """The renderer a run's `Dispatcher` sees: each call is rendered by the pool's workers.

    `render_resilient` submits one task per pipeline call and yields each image as its
    task comes back (in any order; the dispatcher writes and marks each by its index).
    While it waits on the run's thread it serves the run's intake, so a checkpoint the
    trainer writes and prunes meanwhile is still copied aside (the dispatcher may load the
    base, `warm`, on a thread of its own: there the run's loop goes on taking in), and it
    gives up (the rest stays pending) when the run is asked to stop.
    """

    def __init__(
        self, *, run: str, scheduler: Scheduler, base: BaseSpec, daemon: Daemon, run_thread: threading.Thread
    ) -> None:
        self.run = run
        self.scheduler = scheduler
        self.base = base
        self.daemon = daemon
        self.run_thread = run_thread  # the intake's store may be used on this thread only
        self.lora: AppliedLora | None = None
        self._lora_source: Any = None

    @property
    def spec(self) -> ArchSpec:
        return arch_spec(self.base.model.arch)

    @property
    def base_model(self) -> str:
        return self.base.model.name_or_path

    def park(self) -> None:
        """Workers hold the memory; nothing to give back here."""

    def unpark(self) -> None:
        """Workers hold the memory; nothing to take here."""

    def warm(self) -> None:
        """Have the base loaded on a worker, unless one holds it: a base that does not load
        stops the run with its located error, as it stops the daemon."""
        if self.scheduler.holds(self.base.key):
            return
        ticket = self.scheduler.submit(self.run, RenderTask(base=self.base))
        for _ in self._completed([ticket]):
            failure = ticket.future.result().failure
            if failure is not None:
                raise self._error(failure)

    def apply_lora(self, path: str | Path) -> None:
        """Remembered, and handed to the pool (Ray: into its object store) for the tasks to come."""
        self.lora = AppliedLora(Path(path))
        self._lora_source = self.scheduler.pool.lora_source(Path(path))

    def render_resilient(
        self, requests: Sequence[SampleRequest], *, batch_size: int = 1
    ) -> Iterator[tuple[SampleRequest, Image.Image]]:
        by_index = {request.index: request for request in requests}
        tickets = [
            self.scheduler.submit(
                self.run,
                RenderTask(
                    base=self.base,
                    requests=chunk,
                    lora_key=str(self.lora.path) if self.lora else None,
                    lora_name=self.lora.path.name if self.lora else "",
                    lora_source=self._lora_source,
                    batch_size=batch_size,
                ),
            )
            for chunk in chunks(requests, batch_size)
        ]
        waiting = list(tickets)
        try:
            for ticket in self._completed(waiting):
                result = ticket.future.result()
                for image in result.images:
                    yield by_index[image.index], image.image
                if result.failure is not None:
                    raise self._error(result.failure)
        finally:
            self.scheduler.cancel(waiting)

    def _completed(self, tickets: list[Ticket]) -> Iterator[Ticket]:
        """Tickets as they finish, each taken out of `tickets` (what is left there is still to
        come). When the run is asked to stop, those not started yet are given up and those in
        progress still come back (the daemon stops after the current image); the scheduler
        closing ends it at once."""
        while tickets:
            done, _ = concurrent.futures.wait(
                [ticket.future for ticket in tickets],
                timeout=WAIT_SLICE_SECONDS,
                return_when=concurrent.futures.FIRST_COMPLETED,
            )
            finished = [ticket for ticket in tickets if ticket.future in done]
            if any(ticket.future.cancelled() for ticket in finished):
                return
            for ticket in finished:
                tickets.remove(ticket)
                yield ticket
            if finished:
                continue
            if self.daemon.stop_requested:  # after the renders in progress: what has not started waits
                queued = [ticket for ticket in tickets if not ticket.started]
                self.scheduler.cancel(queued)
                tickets[:] = [ticket for ticket in tickets if ticket not in queued]
            self._take_in()

    def _take_in(self) -> None:
        if threading.current_thread() is not self.run_thread:
            return  # the base loading on the dispatcher's preload thread: the run's loop takes in
        try:
            self.daemon.intake.loop_once(time.time())
        except Exception:  # taking in must never break a render (as in the dispatcher)
            logger.exception("taking in checkpoints while waiting for a worker failed")

    def _error(self, failure: WorkerFailure) -> Exception:
        error = failure_error(failure)
        if isinstance(error, ModelError):
            return error.located(self.daemon.intake.plans.config.where(f"model.{error.key}"))
        return error
