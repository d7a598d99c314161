"""sidecar's own settings, in one model, and the samples folder's layout, defined once.

Settings come from a `sidecar:` section of the trainer's config (read by `sidecar.plan`,
which locates a bad value at its line), then the command line on top (`merged`). Every
stage reads them from here; nothing else defines a default for them.

The samples folder is where everything sidecar writes lives:

    SAMPLES_DIR/step_000500/sample_00.png   one folder per checkpoint step (publish)
    SAMPLES_DIR/.sidecar/jobs.sqlite3       the job store (jobs)
    SAMPLES_DIR/.sidecar/cache/<sha256>/    copies of checkpoints not yet rendered (intake)
    SAMPLES_DIR/.sidecar/daemon.json        what the daemon does now (app, for `sidecar status`)

The rule for where it is: `output` when given (`--output` or `sidecar.output`), else
`samples/` inside the run folder the trainer writes checkpoints into (`samples_dir`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

from pydantic import ValidationError, model_validator

from sidecar.errors import ConfigError
from sidecar.values import (
    Flag,
    NonNegativeInt,
    NonNegativeNumber,
    PathValue,
    Section,
    Text,
    choice,
    describe_error,
    rule,
    show,
)

# --- names ---------------------------------------------------------------------------

Backlog = Literal["all", "latest"]
BACKLOG_POLICIES: tuple[Backlog, ...] = ("all", "latest")
OffloadMode = Literal["none", "model", "sequential", "group", "auto"]
OFFLOAD_MODES: tuple[OffloadMode, ...] = ("none", "model", "sequential", "group", "auto")
DTYPE_NAMES = ("auto", "bf16", "fp16", "fp32")
DTYPE_ALIASES = {"bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float32": "fp32"}
LOG_FORMATS = ("plain", "json")
SlotFileMode = Literal["exists", "absent", "lock"]
SLOT_FILE_MODES: tuple[SlotFileMode, ...] = ("exists", "absent", "lock")

SETTLE_SECONDS = 1.0  # a whole checkpoint must stop changing this long before it is read
ABANDON_SECONDS = 120.0  # unchanged this long but still not whole: truncated for good
POLL_INTERVAL_SECONDS = 1.0  # the idle back-off, and the polling observer's interval

# --- the samples folder --------------------------------------------------------------

SAMPLES_DIR_NAME = "samples"
STATE_DIR_NAME = ".sidecar"
JOBS_FILE_NAME = "jobs.sqlite3"
STATE_FILE_NAME = "daemon.json"
LOCK_FILE_NAME = "daemon.lock"
CACHE_DIR_NAME = "cache"
STEP_DIR_FORMAT = "step_{step:06d}"
STEP_DIR_PATTERN = re.compile(r"^step_(\d{6,})$")
SAMPLE_STEM_FORMAT = "sample_{index:02d}"
BASELINE_STEP = 0  # `sidecar render --baseline`: the base model without LoRA, the reference column


def samples_dir(output: Path | None, *, run_dir: Path) -> Path:
    """The samples folder: `output` when given, else `samples/` in the trainer's run folder."""
    return Path(output) if output is not None else Path(run_dir) / SAMPLES_DIR_NAME


@dataclass(frozen=True)
class SamplesFolder:
    """The paths inside one samples folder; nothing is created by naming them."""

    root: Path

    @property
    def state(self) -> Path:
        """`.sidecar/`: the job store, the checkpoint cache, the daemon's state and lock."""
        return self.root / STATE_DIR_NAME

    @property
    def jobs(self) -> Path:
        return self.state / JOBS_FILE_NAME

    @property
    def cache(self) -> Path:
        return self.state / CACHE_DIR_NAME

    @property
    def state_file(self) -> Path:
        return self.state / STATE_FILE_NAME

    @property
    def lock(self) -> Path:
        return self.state / LOCK_FILE_NAME

    def step(self, step: int) -> Path:
        """The folder of one checkpoint's samples: `step_000500`."""
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"`step` must be a non-negative integer, got {step!r}")
        return self.root / STEP_DIR_FORMAT.format(step=step)

    def step_dirs(self) -> dict[int, Path]:
        """`{step: folder}` of the step folders present, by step."""
        found: dict[int, Path] = {}
        try:
            entries = list(self.root.iterdir())
        except OSError:
            return found
        for entry in entries:
            match = STEP_DIR_PATTERN.match(entry.name)
            if match is not None and entry.is_dir():
                found[int(match.group(1))] = entry
        return dict(sorted(found.items()))


# --- the settings model ---------------------------------------------------------------


def _regex_with_step(value: object) -> str:
    """A checkpoint file-name regex: it must compile and name a `step` group."""
    if not isinstance(value, str) or not value:
        raise ValueError(f"must be a regular expression, got {show(value)}")
    try:
        compiled = re.compile(value)
    except re.error as exc:
        raise ValueError(f"must be a valid regular expression ({exc}), got {show(value)}") from None
    if "step" not in compiled.groupindex:
        raise ValueError(
            f"must have a named group `step`, e.g. '_(?P<step>\\d+)\\.safetensors$', got {show(value)}"
        )
    return value


DType = Annotated[str, rule(choice(*DTYPE_NAMES, aliases=DTYPE_ALIASES))]
Offload = Annotated[OffloadMode, rule(choice(*OFFLOAD_MODES))]
BacklogName = Annotated[Backlog, rule(choice(*BACKLOG_POLICIES))]
LogFormat = Annotated[Literal["plain", "json"], rule(choice(*LOG_FORMATS))]
SlotFile = Annotated[SlotFileMode, rule(choice(*SLOT_FILE_MODES))]
StepPattern = Annotated[str, rule(_regex_with_step)]


class Settings(Section):
    """Everything about how sidecar runs: the `sidecar:` section of a trainer config, then the CLI."""

    device: Text | None = None  # e.g. "cuda:1"; None lets sidecar.render.devices choose
    gpu: NonNegativeInt | None = None
    dtype: DType = "auto"
    offload: Offload = "none"
    backlog: BacklogName = "all"  # render every checkpoint not yet done, or skip to the newest
    output: PathValue | None = None  # the samples folder; None: `samples_dir`'s rule
    pattern: StepPattern | None = None  # checkpoint file-name regex; None: each trainer's layouts
    share_gpu: NonNegativeInt | None = None  # one-GPU box: render on cuda:N in the trainer's free slots
    slot_file: PathValue | None = None  # a file the trainer's hooks drive (sidecar.render.slots)
    slot_file_mode: SlotFile = "exists"
    tensorboard: PathValue | None = None
    log_format: LogFormat = "plain"
    settle_seconds: NonNegativeNumber = SETTLE_SECONDS
    abandon_seconds: NonNegativeNumber = ABANDON_SECONDS
    poll_interval_seconds: NonNegativeNumber = POLL_INTERVAL_SECONDS
    polling: Flag = False  # watchdog's polling observer (network filesystems)
    follow_symlinks: Flag = False  # read checkpoints that are symlinks out of the watched folder
    compile: Flag = False  # compile the backbone's repeated blocks once (sidecar.render.compile)

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.abandon_seconds <= self.settle_seconds:
            raise ValueError(
                f"`abandon_seconds` must exceed `settle_seconds` ({self.settle_seconds:g}), "
                f"got {self.abandon_seconds:g}"
            )
        if self.poll_interval_seconds <= 0:
            raise ValueError(f"`poll_interval_seconds` must be > 0, got {self.poll_interval_seconds:g}")
        if self.share_gpu is not None and self.gpu is not None and self.gpu != self.share_gpu:
            raise ValueError(f"`gpu` {self.gpu} and `share_gpu` {self.share_gpu} name different cards")
        return self

    @property
    def compiled_pattern(self) -> re.Pattern[str] | None:
        return re.compile(self.pattern) if self.pattern else None

    @property
    def render_gpu(self) -> int | None:
        """The card to render on: `gpu`, else the card shared with the trainer."""
        return self.gpu if self.gpu is not None else self.share_gpu

    def merged(self, **overrides: object) -> Settings:
        """These settings with the command line's on top; a None override means "not given"."""
        unknown = sorted(set(overrides) - set(type(self).model_fields))
        if unknown:
            raise TypeError(f"unknown sidecar setting(s): {', '.join(unknown)}")
        given = {name: value for name, value in overrides.items() if value is not None}
        if not given:
            return self
        try:
            return type(self).model_validate({**self.model_dump(exclude_unset=True), **given})
        except ValidationError as exc:
            error = exc.errors(include_url=False)[0]
            if not error["loc"]:  # settings that conflict (`_consistent`): no one flag to blame
                reason = str(error["msg"]).removeprefix("Value error, ")
                raise ConfigError(
                    f"the command line and the config's `sidecar:` section together: {reason}"
                ) from None
            name = str(error["loc"][0])
            raise ConfigError(f"`--{name.replace('_', '-')}` {describe_error(error)}") from None
