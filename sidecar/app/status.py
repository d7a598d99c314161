"""`sidecar status`: the daemon's state, the queue, the last rendered step and the failures."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from sidecar.app.state import read_state_file, running_daemon_pid
from sidecar.errors import SidecarError
from sidecar.jobs.store import JobStore
from sidecar.settings import SamplesFolder


def find_job_store(samples_dir: Path) -> Path:
    """The job store of a samples folder; a clear error where `sidecar watch` never ran."""
    path = SamplesFolder(Path(samples_dir)).jobs
    if not path.is_file():
        raise SidecarError(
            f"no sidecar job store at {path}; has `sidecar watch` run on this folder? "
            "With `--output SAMPLES_DIR`, pass that folder"
        )
    return path


def _step_text(step: int | None) -> str:
    return "final" if step is None else f"step {step}"


def status_report(samples_dir: Path) -> str:
    """`sidecar status`: the queue, the last rendered step, failures with reasons, the daemon's state."""
    store_path = find_job_store(samples_dir)
    samples_dir = Path(samples_dir)
    lines = [f"samples folder: {samples_dir}"]
    state = read_state_file(samples_dir)
    if state is not None:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(state.get("since", 0))))
        pid = running_daemon_pid(samples_dir)
        text = str(state.get("state", "?"))
        if pid is not None:
            lines.append(f"daemon: running (pid {pid}), {text} since {since}")
        else:
            lines.append(f"daemon: not running (last state: {text}, at {since})")
    else:
        lines.append("daemon: no state recorded")
    with JobStore(store_path, now=time.time()) as store:
        summary = store.status()
    checkpoints = ", ".join(f"{count} {state}" for state, count in summary.checkpoint_counts.items() if count)
    samples = ", ".join(f"{count} {state}" for state, count in summary.sample_counts.items() if count)
    lines.append(f"checkpoints: {checkpoints or 'none yet'}")
    lines.append(f"samples: {samples or 'none yet'}")
    last = summary.last_rendered_step
    lines.append(f"last rendered: {'none yet' if last is None else f'step {last}'}")
    if summary.queue:
        lines.append(f"queue ({len(summary.queue)}):")
        for job in summary.queue:
            note = f" ({job.error})" if job.error else ""
            lines.append(f"  {_step_text(job.step):<12} {job.state:<8} {job.path}{note}")
    else:
        lines.append("queue: empty")
    waiting = _waiting(state)
    if waiting:
        lines.append(f"not ready yet ({len(waiting)}):")
        lines += [f"  {path}: {reason}" for path, reason in waiting]
    if summary.failures:
        lines.append(f"failures ({len(summary.failures)}):")
        for failure in summary.failures:
            which = "" if failure.sample_index is None else f" sample {failure.sample_index}"
            lines.append(f"  {_step_text(failure.step)}{which} {failure.path}: {failure.error}")
    else:
        lines.append("failures: none")
    if summary.notes:
        lines.append(f"notes (latest {len(summary.notes)}):")
        lines += [f"  {_step_text(job.step):<12} {job.path}: {job.note}" for job in summary.notes]
    return "\n".join(lines)


def _waiting(state: dict[str, Any] | None) -> list[tuple[str, str]]:
    """The files the daemon has seen but that are not ready yet, with why, as it last wrote them."""
    entries = state.get("waiting") if state is not None else None
    if not isinstance(entries, list):
        return []
    return [
        (str(entry.get("path", "?")), str(entry.get("reason", "?")))
        for entry in entries
        if isinstance(entry, dict)
    ]
