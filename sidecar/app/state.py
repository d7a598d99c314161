"""The daemon's state file, `.sidecar/daemon.json`: what it is doing now, for `sidecar status`.

Written atomically whenever what the daemon does changes (rendering, idle, waiting for a
slot); read without torch or the watcher, so `sidecar status` stays instant.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from sidecar.settings import SamplesFolder

logger = logging.getLogger("sidecar.app")


def write_state_file(samples_dir: Path, content: dict[str, Any]) -> None:
    """`.sidecar/daemon.json`, replaced atomically."""
    path = SamplesFolder(Path(samples_dir)).state_file
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        temporary.write_text(json.dumps(content), encoding="utf-8")
        os.replace(temporary, path)
    except OSError as error:  # status is a convenience; never stop rendering for it
        logger.debug("cannot write %s: %s", path, error)


def read_state_file(samples_dir: Path) -> dict[str, Any] | None:
    """What the daemon last wrote about itself, or None."""
    try:
        state = json.loads(SamplesFolder(Path(samples_dir)).state_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) else None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def running_daemon_pid(samples_dir: Path) -> int | None:
    """The pid of the daemon serving `samples_dir` while it runs, else None."""
    state = read_state_file(samples_dir)
    if state is None or state.get("state") == "stopped":
        return None
    pid = int(state.get("pid", 0) or 0)
    return pid if pid and _pid_alive(pid) else None


class StateFile:
    """The daemon's side: record what it does, writing only when that changes."""

    def __init__(self, samples_dir: Path) -> None:
        self.samples_dir = Path(samples_dir)
        self.text = ""

    def set(self, text: str) -> None:
        if text == self.text:
            return
        self.text = text
        write_state_file(self.samples_dir, {"pid": os.getpid(), "state": text, "since": time.time()})
