"""Helpers the readers of other trainers' formats share: a trainer's own keys, checked where
they were written, turned into sidecar's sample settings.

Each reader (`kohya.py`, `onetrainer.py`, `simpletuner.py`) collects values as
`Value(value, path)`, the path being where the trainer wrote it (a TOML path or a JSON
pointer). Validation errors then name the trainer's file, line and key, never sidecar's
field names, which the user never wrote.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from sidecar.plan.config import TrainerConfig
from sidecar.plan.files import Locator
from sidecar.settings import Settings
from sidecar.values import as_text, describe_error

logger = logging.getLogger("sidecar.plan")

T = TypeVar("T")
ModelT = TypeVar("ModelT", bound=BaseModel)


@dataclass(frozen=True)
class Value:
    """A value from a trainer's file and the path it was written at."""

    value: Any
    path: str


def checked(value: Value, rule: Callable[[object], T], locator: Locator) -> T:
    """`rule(value)`, or a ConfigError at the trainer's key naming the rule and the value."""
    try:
        return rule(value.value)
    except ValueError as exc:
        raise locator.error(value.path, str(exc)) from None


def validated(model: type[ModelT], values: Mapping[str, Value], locator: Locator) -> ModelT:
    """`model` from sidecar field -> Value; the first bad value is located at its trainer key."""
    raw = {name: value.value for name, value in values.items()}
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        error = exc.errors(include_url=False)[0]
        field = str(error["loc"][0]) if error["loc"] else ""
        where = values[field].path if field in values else ""
        raise locator.error(where, describe_error(error)) from None


def unused(locator: Locator, path: str, why: str) -> None:
    """Say once, at debug level (`-v`), that a trainer setting has no meaning for sidecar."""
    logger.debug("%s not used by sidecar: %s", locator.where(path), why)


def unread(locator: Locator, keys: Iterable[str], read: Iterable[str]) -> None:
    """Say at debug level (`-v`), in one line, which of a trainer's settings sidecar does not
    read: training settings with no meaning for sample images."""
    others = sorted(set(keys) - set(read))
    if others:
        where = locator.where("")
        logger.debug("%s settings not used by sidecar (training only): %s", where, ", ".join(others))


def find_beside(value: str, config_dir: Path) -> Path | None:
    """A path a config names, found as its trainer would: absolute; else relative to the config's
    folder, else to a folder above it (trainers resolve from the folder they run in, which is
    usually the one holding their `config/` or `training_presets/` folder). None if nowhere."""
    path = Path(value).expanduser()
    if path.is_absolute():
        return path if path.exists() else None
    for folder in (config_dir, *config_dir.parents):
        if (folder / path).exists():
            return (folder / path).resolve()
    return None


def prompt_file(value: Value, config_dir: Path, locator: Locator) -> Path:
    """The prompt file a config names, found beside the config or above it (`find_beside`).

    One found nowhere is returned as it would be beside the config: the plan says so, located
    at the config's key, only when it needs the file; a `--prompts` file wins without it.
    """
    text = checked(value, as_text, locator)
    return find_beside(text, config_dir) or config_dir / text


def trainer_config(path: Path, **fields: Any) -> TrainerConfig:
    """A `TrainerConfig` read from a trainer other than ai-toolkit: no processes, no trigger word,
    no `sidecar:` section (sidecar's settings come from the command line), prompts as written."""
    return TrainerConfig(
        path=path.resolve(),
        training_folder=None,
        trigger_word=None,
        sidecar=Settings(),
        process_index=None,
        yaml_prefix="",
        expands_prompts=False,
        **fields,
    )
