"""The results: a plain-text table for the terminal and `results.json` with the machine and versions."""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench.common import Figure, Profile

VERSIONED = ("torch", "diffusers", "transformers", "peft", "watchdog")
COLUMNS = ("benchmark", "case", "metric", "median", "min", "max", "n", "target", "met")
PHASES_BENCHMARK = "phases"  # `call_overhead`'s breakdown: printed as a table of its own


def machine() -> dict[str, Any]:
    import torch

    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in VERSIONED:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def results(figures: Sequence[Figure], *, profile: Profile, seconds: float) -> dict[str, Any]:
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "profile": asdict(profile),
        "machine": machine(),
        "versions": versions(),
        "seconds": round(seconds, 1),
        "figures": [figure.to_json() for figure in figures],
    }


def write(path: Path, content: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")


def _number(value: float, unit: str) -> str:
    if unit == "MiB":
        return f"{value:.0f}"
    if abs(value) >= 100:
        return f"{value:.0f}"
    return f"{value:.3f}" if abs(value) < 10 else f"{value:.2f}"


def table(figures: Sequence[Figure]) -> str:
    """One row per figure; the target and whether it is met where the issue sets one.

    The per-phase figures get a table of their own (`phase_table`)."""
    rows = [COLUMNS]
    for figure in figures:
        if figure.benchmark == PHASES_BENCHMARK:
            continue
        stats, unit = figure.stats, figure.unit
        met = {None: "", True: "yes", False: "NO"}[figure.met]
        rows.append(
            (
                figure.benchmark,
                figure.case,
                f"{figure.metric} ({unit})",
                _number(getattr(stats, figure.statistic), unit),
                _number(stats.minimum, unit),
                _number(stats.maximum, unit),
                str(stats.count),
                "" if figure.target is None else str(figure.target),
                met,
            )
        )
    return _aligned(rows, left=3)


def phase_table(figures: Sequence[Figure]) -> str:
    """Milliseconds per checkpoint of each phase (median), one row per case; empty without them."""
    phases = [f for f in figures if f.benchmark == PHASES_BENCHMARK]
    if not phases:
        return ""
    names = list(dict.fromkeys(f.metric for f in phases))
    cases = list(dict.fromkeys(f.case for f in phases))
    value = {(f.case, f.metric): f.stats.median for f in phases}
    rows = [("ms per checkpoint", *names)]
    rows += [(case, *(_number(value.get((case, name), 0.0), "ms") for name in names)) for case in cases]
    return _aligned(rows, left=1)


def _aligned(rows: Sequence[Sequence[str]], *, left: int) -> str:
    """Columns padded to their widest cell; the first `left` columns left-aligned; a rule under the head."""
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    lines = []
    for number, row in enumerate(rows):
        cells = [
            cell.ljust(width) if column < left else cell.rjust(width)
            for column, (cell, width) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
        if number == 0:
            lines.append("  ".join("-" * width for width in widths))
    return "\n".join(lines)


def header(content: dict[str, Any]) -> str:
    cpu = content["machine"]
    v = content["versions"]
    return (
        f"sidecar bench ({content['profile']['name']}), {content['date']}, {content['seconds']:.0f} s\n"
        f"{cpu['cpu']}, {cpu['cores_usable']} of {cpu['cores']} cores, torch threads {cpu['torch_threads']}; "
        f"python {v['python']}, torch {v['torch']}, diffusers {v['diffusers']}, "
        f"transformers {v['transformers']}, peft {v['peft']}"
    )
