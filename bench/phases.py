"""Where a checkpoint's time goes inside the daemon: timed spans of its phases, per thread.

`PhaseRecorder` wraps, while it is active, the functions each phase runs (class
attributes and module attributes, restored on exit) and records one span per call:
its phase, its thread, when it began and ended, and its own time (less the spans nested
in it: hashing inside the copy, PNG encoding inside a sample write or a grid). Wrapping
costs a few microseconds per call, a handful of calls per image.

`breakdown(start, end)` gives the own time of each phase within a window (a span
crossing its edges counts pro rata), on the daemon's thread (the render path) and on the
others (the publisher, the base loading ahead), and what is left of the window:
- *detection*: the checkpoint whole -> the intake starts copying it (settle and idle
  back-off; `detection.py` measures it alone);
- *other*: the rest of the render path's time that no phase accounts for (loop overhead,
  the scheduler built per call, Python between phases, waits for the GIL).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from PIL import Image

# The phases in the order a checkpoint meets them; `__call__` is the pipeline's own time.
PHASES = (
    "detection",
    "copy",
    "hashing",
    "store writes",
    "swap",
    "prompt encoding",
    "__call__",
    "PNG encoding",
    "sample files",
    "grid",
    "gallery",
    "TensorBoard",
    "other",
)
RENDER_THREAD = "bench-daemon"  # `bench.harness.DaemonHarness` runs the daemon on this thread


@dataclass(frozen=True)
class Span:
    phase: str
    thread: str
    start: float
    end: float
    own: float  # seconds not spent in spans nested in this one


class _TimedHash:
    """A `hashlib.sha256` object whose `update` calls are spans of the `hashing` phase."""

    def __init__(self, recorder: PhaseRecorder, inner: Any) -> None:
        self._recorder = recorder
        self._inner = inner

    def update(self, data: bytes) -> None:
        with self._recorder.span("hashing"):
            self._inner.update(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class _HashlibProxy:
    """`hashlib` as `sidecar.intake.cache` sees it while recording: sha256 objects are timed."""

    def __init__(self, recorder: PhaseRecorder) -> None:
        self._recorder = recorder

    def sha256(self, *args: Any, **kwargs: Any) -> _TimedHash:
        return _TimedHash(self._recorder, hashlib.sha256(*args, **kwargs))

    def __getattr__(self, name: str) -> Any:
        return getattr(hashlib, name)


class PhaseRecorder:
    """Records spans of the daemon's phases while active (a context manager)."""

    def __init__(self, pipeline_class: type) -> None:
        self.pipeline_class = pipeline_class
        self.spans: list[Span] = []
        self._lock = threading.Lock()
        self._stacks = threading.local()
        self._undo: list[Callable[[], None]] = []

    @contextlib.contextmanager
    def span(self, phase: str) -> Iterator[None]:
        stack: list[list[float]] = self._stacks.__dict__.setdefault("stack", [])
        frame = [0.0]  # seconds of the spans nested in this one
        stack.append(frame)
        started = time.perf_counter()
        try:
            yield
        finally:
            ended = time.perf_counter()
            stack.pop()
            if stack:
                stack[-1][0] += ended - started
            span = Span(phase, threading.current_thread().name, started, ended, ended - started - frame[0])
            with self._lock:
                self.spans.append(span)

    def _wrap(self, owner: Any, name: str, phase: str) -> None:
        original = owner[name] if isinstance(owner, dict) else getattr(owner, name)

        @functools.wraps(original)
        def timed(*args: Any, **kwargs: Any) -> Any:
            with self.span(phase):
                return original(*args, **kwargs)

        if isinstance(owner, dict):
            owner[name] = timed
            self._undo.append(lambda: owner.__setitem__(name, original))
        elif isinstance(owner, type) and name not in vars(owner):  # inherited: shadowed, then unshadowed
            setattr(owner, name, timed)
            self._undo.append(lambda: delattr(owner, name))
        else:
            setattr(owner, name, timed)
            self._undo.append(lambda: setattr(owner, name, original))

    def __enter__(self) -> PhaseRecorder:
        import sidecar.app.rendering as rendering
        import sidecar.intake.cache as cache
        import sidecar.publish.step as step
        from sidecar.jobs.store import JobStore
        from sidecar.publish.tensorboard import TensorBoardSink
        from sidecar.render.base import Renderer

        self._wrap(cache.CheckpointCache, "copy_in", "copy")
        for method in ("add_checkpoint", "claim_next_checkpoint", "mark_sample_done", "finish_checkpoint"):
            self._wrap(JobStore, method, "store writes")
        self._wrap(Renderer, "apply_lora", "swap")
        self._wrap(Renderer, "embeddings", "prompt encoding")
        self._wrap(self.pipeline_class, "__call__", "__call__")
        self._wrap(Image.SAVE, "PNG", "PNG encoding")
        self._wrap(rendering, "write_sample", "sample files")
        self._wrap(step, "write_step_grid", "grid")
        self._wrap(step, "build_gallery", "gallery")
        self._wrap(TensorBoardSink, "add_samples", "TensorBoard")
        proxy = _HashlibProxy(self)
        cache.hashlib = proxy  # type: ignore[assignment]
        self._undo.append(lambda: setattr(cache, "hashlib", hashlib))
        return self

    def __exit__(self, *exc_info: object) -> None:
        while self._undo:
            self._undo.pop()()

    def first_start(self, phase: str, *, after: float, thread: str = RENDER_THREAD) -> float | None:
        """When the first span of `phase` on `thread` began at or after `after`."""
        with self._lock:
            starts = [
                s.start for s in self.spans if s.phase == phase and s.thread == thread and s.start >= after
            ]
        return min(starts, default=None)

    def breakdown(self, start: float, end: float) -> tuple[dict[str, float], dict[str, float]]:
        """(render path, other threads): seconds of each phase's own time within `[start, end]`.

        The render path's `detection` is the time from `start` to its first copy that no
        phase accounts for; `other` is the rest of the window no phase accounts for.
        """
        copied = self.first_start("copy", after=start)
        edge = min(copied, end) if copied is not None else end
        before, _ = self._own_time(start, edge)
        on_path, off_path = self._own_time(start, end)
        on_path["detection"] = max(0.0, (edge - start) - sum(before.values()))
        accounted = sum(seconds for phase, seconds in on_path.items() if phase != "other")
        on_path["other"] = max(0.0, (end - start) - accounted)
        return on_path, {phase: seconds for phase, seconds in off_path.items() if seconds > 0}

    def _own_time(self, start: float, end: float) -> tuple[dict[str, float], dict[str, float]]:
        """Own seconds per phase within `[start, end]`, on the render path and off it."""
        on_path: dict[str, float] = dict.fromkeys(PHASES, 0.0)
        off_path: dict[str, float] = dict.fromkeys(PHASES, 0.0)
        with self._lock:
            spans = list(self.spans)
        for span in spans:
            inside = min(span.end, end) - max(span.start, start)
            if inside <= 0 or span.end <= span.start:
                continue
            share = span.own * inside / (span.end - span.start)
            (on_path if span.thread == RENDER_THREAD else off_path)[span.phase] += share
        return on_path, off_path
