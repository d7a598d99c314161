"""What `sidecar status` reads: the daemon's state file and its job store.

The daemon writes `SAMPLES_DIR/.sidecar/daemon.json` whenever what it does changes
(rendering, idle, waiting for a slot); the job store holds the queue and the failures.
Reading both needs neither torch nor the watcher, so `sidecar status` stays instant.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from sidecar.errors import SidecarError
from sidecar.jobs import JobStore

logger = logging.getLogger("sidecar.status")

STATE_DIR_NAME = ".sidecar"
JOBS_FILE_NAME = "jobs.sqlite3"
STATE_FILE_NAME = "daemon.json"


def state_dir(samples_dir: Path) -> Path:
    """`SAMPLES_DIR/.sidecar`: the job store, the checkpoint cache, the daemon's state."""
    return Path(samples_dir) / STATE_DIR_NAME


def write_state_file(samples_dir: Path, content: dict[str, Any]) -> None:
    """`.sidecar/daemon.json`, replaced atomically."""
    path = state_dir(samples_dir) / STATE_FILE_NAME
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        temporary.write_text(json.dumps(content), encoding="utf-8")
        os.replace(temporary, path)
    except OSError as error:  # status is a convenience; never stop rendering for it
        logger.debug("cannot write %s: %s", path, error)


def find_job_store(path: Path) -> Path:
    """The job store of a samples folder, or of an output folder's `samples/`."""
    path = Path(path)
    candidates = [state_dir(path) / JOBS_FILE_NAME, state_dir(path / "samples") / JOBS_FILE_NAME]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise SidecarError(
        f"no sidecar job store at {' or '.join(str(c) for c in candidates)}; has `sidecar watch` run "
        "on this folder? With `--output SAMPLES_DIR`, pass that folder"
    )


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _step_text(step: int | None) -> str:
    return "final" if step is None else f"step {step}"


def read_state_file(samples_dir: Path) -> dict[str, Any] | None:
    """What the daemon last wrote about itself, or None."""
    try:
        state = json.loads((state_dir(samples_dir) / STATE_FILE_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) else None


def running_daemon_pid(samples_dir: Path) -> int | None:
    """The pid of the daemon serving `samples_dir` while it runs, else None."""
    state = read_state_file(samples_dir)
    if state is None or state.get("state") == "stopped":
        return None
    pid = int(state.get("pid", 0) or 0)
    return pid if pid and _pid_alive(pid) else None


def status_report(path: Path) -> str:
    """`sidecar status`: the queue, the last rendered step, failures with reasons, the daemon's state."""
    store_path = find_job_store(path)
    samples_dir = store_path.parent.parent
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
    if summary.failures:
        lines.append(f"failures ({len(summary.failures)}):")
        for failure in summary.failures:
            which = "" if failure.sample_index is None else f" sample {failure.sample_index}"
            lines.append(f"  {_step_text(failure.step)}{which} {failure.path}: {failure.error}")
    else:
        lines.append("failures: none")
    return "\n".join(lines)
