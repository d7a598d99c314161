"""Which render goes to which worker: runs served in turn, each base where it is already loaded.

The coordinator's runs submit tickets (one `RenderTask` each: a pipeline call's worth of
one checkpoint's samples, or a base to load); the scheduler's thread hands them to free
workers of a pool (`LocalPool` in process, `RayPool` on Ray) and resolves each ticket's
future with the worker's result.

- **Fairness.** Runs are served in turn: the run served least recently goes first, and a
  task is one pipeline call, so a run's new checkpoint waits for at most the render in
  progress on the worker that takes it, however long another run's backlog is.
- **Affinity.** A free worker takes, in that turn order, the first run whose base it holds
  (the LoRA is swapped in place), or whose base no worker holds (it has to load somewhere).
  It leaves its base for another only when its base has no work queued, or after holding
  it `HOLD_FACTOR` times as long as loading it took: one worker serving two bases
  alternates between them without spending more than about 1/`HOLD_FACTOR` of its time
  loading. An empty worker joins a loaded base; an idle one moves to a base whose queue
  is longer than `REBALANCE_QUEUED_PER_HOLDER` tasks per worker already holding it.
- **Faults.** A worker lost mid-render (its process killed, its node gone, out of memory)
  fails its task with an error the pool recognises; the ticket goes back to the front of
  its run's queue and renders once on the next worker free, while the pool revives the
  lost one (Ray restarts the actor). A checkpoint whose renders kill a worker
  `MAX_INTERRUPTIONS` times fails instead of taking workers down forever.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from sidecar.app.worker import Pool, RenderTask, TaskResult, WorkerFailure
from sidecar.jobs.policy import MAX_INTERRUPTIONS

logger = logging.getLogger("sidecar.scheduler")

HOLD_FACTOR = 5.0  # a worker keeps a base with work queued for at least this many times its load time
REBALANCE_QUEUED_PER_HOLDER = 4  # tasks queued per holding worker before an idle worker moves to that base
REVIVE_RETRY_SECONDS = 10.0  # a lost worker that does not come back is asked again after this
STARTED_KEPT = 1000  # tasks remembered in `Scheduler.started`


@dataclass(eq=False)
class Ticket:
    """One submitted task; `future` resolves to the worker's `TaskResult`."""

    run: str
    task: RenderTask
    future: concurrent.futures.Future[TaskResult] = field(default_factory=concurrent.futures.Future)
    started: bool = False  # handed to a worker
    cancelled: bool = False


@dataclass(eq=False)
class WorkerSlot:
    """What the scheduler knows of one worker."""

    index: int
    state: Literal["free", "busy", "reviving"] = "free"
    base_key: str | None = None  # held, or being loaded by the task in progress
    held_since: float = 0.0
    load_seconds: float = 0.0
    revive_at: float | None = None  # reviving: when to ask the pool again


def choose(
    *,
    worker_base: str | None,
    may_switch: bool,
    heads: Sequence[tuple[str, str]],
    holders: Mapping[str, int],
    queued: Mapping[str, int],
) -> int | None:
    """The index in `heads` of the run a free worker serves next, or None to stay idle.

    `heads`: (run, base key of its next task), runs in turn order (least recently served
    first). `holders`: base key -> workers holding it; `queued`: base key -> tasks queued.
    `worker_base`: the base this worker holds; `may_switch`: whether it may leave it.
    """
    for position, (_, base) in enumerate(heads):
        if base == worker_base:
            return position
        if holders.get(base, 0) == 0 and (worker_base is None or may_switch):
            return position
    if not heads:
        return None
    if worker_base is None:
        return 0  # an empty worker joins the first base in turn: more hands for a busy base
    if may_switch and queued.get(worker_base, 0) == 0:
        for position, (_, base) in enumerate(heads):
            if queued.get(base, 0) > REBALANCE_QUEUED_PER_HOLDER * holders.get(base, 0):
                return position
    return None


class Scheduler:
    """Hands tickets to a pool's workers on a thread of its own; see the module docstring."""

    def __init__(self, pool: Pool, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.pool = pool
        self.clock = clock
        self.slots = [WorkerSlot(index) for index in range(pool.size)]
        self._queues: dict[str, collections.deque[Ticket]] = {}
        self._turns: list[str] = []  # runs, least recently served first
        self._served: set[str] = set()
        self._deaths: collections.Counter[tuple[str, str | None]] = collections.Counter()
        self._events: list[tuple[Any, ...]] = []
        self._cond = threading.Condition(threading.RLock())  # done-callbacks may run on the holder's thread
        self._dirty = False
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="scheduler", daemon=True)
        # (run, worker, sample indices) of the latest tasks started, in order (tests, the bench)
        self.started: collections.deque[tuple[str, int, tuple[int, ...]]]
        self.started = collections.deque(maxlen=STARTED_KEPT)

    # --- the runs' side ---------------------------------------------------------------

    def start(self) -> Scheduler:
        """Start handing out work; each worker gets work once it answers (a Ray actor may wait
        for a node with room, or be restarting)."""
        with self._cond:
            for slot in self.slots:
                slot.state = "reviving"
                self._revive(slot)
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop handing out tickets; those still queued are cancelled."""
        with self._cond:
            self._closed = True
            for queue in self._queues.values():
                for ticket in queue:
                    ticket.cancelled = True
                    ticket.future.cancel()
            self._queues.clear()
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join()

    def submit(self, run: str, task: RenderTask) -> Ticket:
        ticket = Ticket(run, task)
        with self._cond:
            if self._closed:
                ticket.future.cancel()
                return ticket
            if run not in self._turns:  # never served: ahead of every run served, after earlier newcomers
                served = [position for position, name in enumerate(self._turns) if name in self._served]
                self._turns.insert(served[0] if served else len(self._turns), run)
            self._queues.setdefault(run, collections.deque()).append(ticket)
            self._wake()
        return ticket

    def cancel(self, tickets: Iterable[Ticket]) -> None:
        """Tickets no longer wanted: queued ones never start, running ones' results are dropped."""
        with self._cond:
            for ticket in tickets:
                ticket.cancelled = True
                queue = self._queues.get(ticket.run)
                if queue is not None and ticket in queue:
                    queue.remove(ticket)
                    ticket.future.cancel()

    def forget_run(self, run: str) -> None:
        """A run that stopped: its queue, turn and counts go."""
        with self._cond:
            self.cancel(list(self._queues.pop(run, ())))
            if run in self._turns:
                self._turns.remove(run)
            self._served.discard(run)
            for key in [key for key in self._deaths if key[0] == run]:
                del self._deaths[key]

    def holds(self, base_key: str) -> bool:
        """Whether a worker holds this base, or is loading it now."""
        with self._cond:
            return any(slot.base_key == base_key and slot.state != "reviving" for slot in self.slots)

    def queued(self, run: str) -> int:
        with self._cond:
            return len(self._queues.get(run, ()))

    # --- the scheduler's thread -----------------------------------------------------------

    def _wake(self) -> None:
        self._dirty = True
        self._cond.notify_all()

    def _post(self, *event: Any) -> None:
        with self._cond:
            self._events.append(event)
            self._wake()

    def _loop(self) -> None:
        timeout: float | None = None
        while True:
            with self._cond:
                if not self._dirty and not self._closed:
                    self._cond.wait(timeout)
                if self._closed:
                    return
                self._dirty = False
                events, self._events = self._events, []
                try:
                    for event in events:
                        self._handle(*event)
                    timeout = self._dispatch()
                except Exception:  # the scheduler must outlive any one bad event
                    logger.exception("the scheduler failed to hand out work; going on")
                    timeout = REVIVE_RETRY_SECONDS

    def _handle(self, kind: str, slot: WorkerSlot, *rest: Any) -> None:
        if kind == "revived":
            (future,) = rest
            error = future.exception()
            if error is None:
                logger.debug("worker %s is ready", slot.index)
                slot.state, slot.revive_at = "free", None
            else:
                logger.warning("worker %s is not ready yet (%s); asking again", slot.index, error)
                slot.revive_at = self.clock() + REVIVE_RETRY_SECONDS
            return
        ticket, future = rest
        error = future.exception()
        if error is not None and self.pool.worker_lost(error):
            self._lost(slot, ticket, error)
            return
        slot.state = "free"
        if error is not None:  # the pool could not run the task at all (e.g. not serializable)
            slot.base_key = None
            if not ticket.cancelled:
                ticket.future.set_exception(error)
            return
        result: TaskResult = future.result()
        if result.load_seconds > 0:
            slot.held_since, slot.load_seconds = self.clock(), result.load_seconds
        slot.base_key = result.base_key
        if not ticket.cancelled:
            ticket.future.set_result(result)

    def _lost(self, slot: WorkerSlot, ticket: Ticket, error: BaseException) -> None:
        """The worker died with `ticket` in progress: the ticket goes back to the front of its
        queue (or fails, the `MAX_INTERRUPTIONS`-th time), the worker is revived."""
        slot.state, slot.base_key = "reviving", None
        self._revive(slot)
        key = (ticket.run, ticket.task.lora_key)
        self._deaths[key] += 1
        deaths = self._deaths[key]
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if ticket.cancelled:
            logger.warning("worker %s was lost (%s)", slot.index, first_line)
        elif deaths >= MAX_INTERRUPTIONS:
            message = (
                f"a render worker died {deaths} times rendering this checkpoint (last: {first_line}); "
                "not retried again (look for a crash or an out-of-memory kill in the worker's log)"
            )
            ticket.future.set_result(TaskResult(failure=WorkerFailure("checkpoint", message)))
        else:
            logger.warning(
                "worker %s was lost in the middle of a render (%s); its samples go to the next free worker",
                slot.index,
                first_line,
            )
            ticket.started = False
            self._queues.setdefault(ticket.run, collections.deque()).appendleft(ticket)

    def _revive(self, slot: WorkerSlot) -> None:
        slot.revive_at = None
        future = self.pool.revive(slot.index)
        future.add_done_callback(lambda done, slot=slot: self._post("revived", slot, done))

    def _dispatch(self) -> float | None:
        """Start what can start; returns the seconds until a held base may be left, or None."""
        now = self.clock()
        wait: float | None = None
        for slot in self.slots:
            if slot.state == "reviving" and slot.revive_at is not None:
                if now >= slot.revive_at:
                    self._revive(slot)
                else:
                    wait = _earliest(wait, slot.revive_at - now)
        for slot in self.slots:
            if slot.state != "free":
                continue
            heads = [(run, queue[0].task.base.key) for run in self._turns if (queue := self._queues.get(run))]
            if not heads:
                break
            holders = collections.Counter(
                s.base_key for s in self.slots if s.base_key is not None and s.state != "reviving"
            )
            queued = collections.Counter(t.task.base.key for q in self._queues.values() for t in q)
            hold_until = slot.held_since + HOLD_FACTOR * slot.load_seconds
            may_switch = slot.base_key is None or queued.get(slot.base_key, 0) == 0 or now >= hold_until
            pick = choose(
                worker_base=slot.base_key, may_switch=may_switch, heads=heads, holders=holders, queued=queued
            )
            if pick is None:
                if not may_switch:
                    wait = _earliest(wait, hold_until - now)
                continue
            self._start(slot, self._queues[heads[pick][0]].popleft(), now)
        return wait

    def _start(self, slot: WorkerSlot, ticket: Ticket, now: float) -> None:
        self._turns.remove(ticket.run)
        self._turns.append(ticket.run)  # served: to the back of the line
        self._served.add(ticket.run)
        if slot.base_key != ticket.task.base.key:
            slot.base_key, slot.held_since, slot.load_seconds = ticket.task.base.key, now, 0.0
        slot.state, ticket.started = "busy", True
        self.started.append((ticket.run, slot.index, tuple(r.index for r in ticket.task.requests)))
        try:
            future = self.pool.submit(slot.index, ticket.task)
        except Exception as error:  # e.g. a task Ray cannot serialize: that ticket fails, not the loop
            future = concurrent.futures.Future()
            future.set_exception(error)
        future.add_done_callback(lambda done, s=slot, t=ticket: self._post("done", s, t, done))


def _earliest(current: float | None, candidate: float) -> float:
    candidate = max(candidate, 0.01)
    return candidate if current is None else min(current, candidate)
