"""The fault matrices' harness: the real daemon in the test's thread, a simulated trainer in another."""

from __future__ import annotations

import threading
from collections.abc import Callable

from sidecar.app.watch import Daemon, WatchRequest, run_watch

RUN_LIMIT_SECONDS = 120.0  # a daemon still running after this is stopped and the test fails


def run_beside(request: WatchRequest, trainer: Callable[[], None], renderer) -> tuple[int, Daemon]:
    """`run_watch(request)` while `trainer` runs in another thread; ends once the trainer has.

    Returns the exit code and the daemon. The trainer's own errors fail the test; an error of the
    daemon is raised at once, without waiting for a trainer that may be waiting for it.
    """
    done = threading.Event()
    errors: list[BaseException] = []

    def train() -> None:
        try:
            trainer()
        except BaseException as error:
            errors.append(error)
        finally:
            done.set()

    daemons: list[Daemon] = []
    timer = threading.Timer(RUN_LIMIT_SECONDS, lambda: [d.request_stop() for d in daemons])
    thread = threading.Thread(target=train, daemon=True)
    thread.start()
    timer.start()
    try:
        code = run_watch(
            request, renderer_factory=lambda: renderer, until=done.is_set, daemon_ready=daemons.append
        )
    finally:
        timer.cancel()
    thread.join(timeout=RUN_LIMIT_SECONDS)
    assert not errors, errors
    assert not daemons[0].stop_requested, f"the daemon was still running after {RUN_LIMIT_SECONDS} s"
    return code, daemons[0]
