"""The sweep file `runs.yaml`: the training runs one coordinator serves, and their status.

```yaml
- output: /data/sweep/lr-1e-4            # the folder the trainer writes checkpoints into
  config: /data/sweep/lr-1e-4/config.yaml
- output: /data/sweep/lr-3e-4
  config: configs/lr-3e-4.yaml           # relative paths: from this file's folder
  samples: /srv/samples/lr-3e-4          # optional; default OUTPUT/samples
  name: lr-3e-4                          # optional; default the output folder's name
  process: 0                             # optional, as --process; also prompts: FILE, as --prompts
```

`config` may be left out: the config the trainer keeps or copies in the run folder is
used, as `sidecar watch OUTPUT_DIR` finds it. The file is read again when it changes
(`RunsFile`); a bad edit is logged and the runs already known are kept.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from sidecar.app.state import read_state_file, running_daemon_pid
from sidecar.errors import ConfigError
from sidecar.intake.split import file_signature
from sidecar.jobs.store import JobStore
from sidecar.plan.locator import read_yaml, validate, warn_unknown_keys
from sidecar.settings import SamplesFolder, samples_dir
from sidecar.values import NonNegativeInt, PathValue, Section, Text, show

logger = logging.getLogger("sidecar.runs")

RUNS_SHAPE = "a list of runs, each `{output: OUTPUT_DIR, config: TRAINER_CONFIG}`"


class RunEntry(Section):
    """One item of `runs.yaml`."""

    output: PathValue
    config: PathValue | None = None
    samples: PathValue | None = None
    name: Text | None = None
    process: NonNegativeInt | Text | None = None  # which `config.process[]` entry, as `--process`
    prompts: PathValue | None = None  # a prompt file instead of the config's prompts, as `--prompts`


@dataclass(frozen=True)
class RunSpec:
    """A training run the coordinator serves; paths are absolute."""

    name: str
    output: Path
    config: Path | None = None  # None: found in the run folder
    samples: Path | None = None  # None: OUTPUT/samples (or the config's `sidecar.output`)
    process: int | str | None = None
    prompts: Path | None = None

    @property
    def samples_dir(self) -> Path:
        return samples_dir(self.samples, run_dir=self.output)


def _absolute(path: Path | None, base: Path) -> Path | None:
    if path is None:
        return None
    return path if path.is_absolute() else (base / path).absolute()


def read_runs(path: Path) -> list[RunSpec]:
    """The runs of a sweep file; raises `ConfigError` located at the bad item.

    Names must be unique (they tag the log lines and `sidecar status --runs`), and so must
    samples folders (one writer per folder).
    """
    data, locator = read_yaml(Path(path))
    if data is None:
        return []
    if not isinstance(data, list):
        raise locator.error("", f"must be {RUNS_SHAPE}, got {show(data)}")
    base = Path(path).absolute().parent
    runs: list[RunSpec] = []
    names: dict[str, str] = {}
    folders: dict[Path, str] = {}
    for index, raw in enumerate(data):
        where = f"[{index}]"
        if not isinstance(raw, dict):
            raise locator.error(where, f"must be a mapping like `{{output: OUTPUT_DIR}}`, got {raw!r}")
        warn_unknown_keys(raw, RunEntry, frozenset(), where, locator)
        entry: RunEntry = validate(RunEntry, raw, locator, where)
        output = _absolute(entry.output, base)
        assert output is not None
        run = RunSpec(
            name=entry.name or output.name,
            output=output,
            config=_absolute(entry.config, base),
            samples=_absolute(entry.samples, base),
            process=entry.process,
            prompts=_absolute(entry.prompts, base),
        )
        if run.name in names:
            raise locator.error(
                f"{where}.name" if entry.name else f"{where}.output",
                f"run name {run.name!r} is also that of {names[run.name]}; give each run its own `name:`",
            )
        folder = run.samples_dir.resolve()
        if folder in folders:
            raise locator.error(
                where, f"samples folder {folder} is also run {folders[folder]!r}'s; one writer per folder"
            )
        names[run.name], folders[folder] = f"item {index}", run.name
        runs.append(run)
    return runs


class FixedRuns:
    """The runs of the command line (`sidecar watch OUTPUT_DIR --ray ...`): never change."""

    def __init__(self, runs: list[RunSpec]) -> None:
        self.runs = runs

    def reload_if_changed(self) -> bool:
        return False


class RunsFile:
    """`runs.yaml`, read again whenever it changes while the coordinator runs."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.runs = read_runs(self.path)  # a bad file at startup is the caller's error
        self._signature = file_signature(self.path)

    def reload_if_changed(self) -> bool:
        """True when the file changed and its new runs were read; a bad edit keeps the old runs."""
        signature = file_signature(self.path)
        if signature == self._signature:
            return False
        self._signature = signature
        try:
            runs = read_runs(self.path)
        except ConfigError as error:
            logger.error("%s changed but is not valid; keeping the runs known: %s", self.path, error)
            return False
        self.runs = runs
        logger.info("%s changed: %s run(s)", self.path, len(runs))
        return True


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{count} {state}" for state, count in counts.items() if count) or "none yet"


def runs_status(path: Path) -> str:
    """`sidecar status --runs runs.yaml`: one block per run; `sidecar status OUTPUT_DIR` has the details."""
    runs = read_runs(Path(path))
    lines = [f"{path}: {len(runs)} run(s)"]
    for run in runs:
        folder = SamplesFolder(run.samples_dir)
        lines.append(f"{run.name}: {run.output}")
        lines.append(f"  samples folder: {folder.root}")
        if not folder.jobs.is_file():
            lines.append("  no job store yet (the coordinator has not served this run)")
            continue
        state = read_state_file(folder.root)
        pid = running_daemon_pid(folder.root)
        text = str(state.get("state", "?")) if state is not None else "no state recorded"
        lines.append(f"  {'running (pid ' + str(pid) + ')' if pid is not None else 'not running'}: {text}")
        with JobStore(folder.jobs, now=time.time()) as store:
            summary = store.status()
        last = summary.last_rendered_step
        lines.append(f"  checkpoints: {_counts(summary.checkpoint_counts)}")
        lines.append(f"  samples: {_counts(summary.sample_counts)}")
        lines.append(
            f"  last rendered: {'none yet' if last is None else f'step {last}'}; queue {len(summary.queue)};"
            f" failures {len(summary.failures)}"
        )
        for failure in summary.failures[-1:]:
            step = "final" if failure.step is None else f"step {failure.step}"
            lines.append(f"  latest failure: {step} {failure.path.name}: {failure.error}")
    return "\n".join(lines)
