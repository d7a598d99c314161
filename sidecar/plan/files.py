"""TOML and JSON trainer files, read with what a located error needs.

YAML keeps each node's line (`locator.read_yaml`). For TOML (kohya sd-scripts, musubi-tuner,
SimpleTuner's `config.toml`) the standard `tomllib` gives the data and the line of a syntax
error but no line per key, so `toml_lines` finds them by scanning the text: table headers,
arrays of tables and `key =` lines, skipping multi-line strings and arrays. No maintained
TOML library keeps positions (tomlkit keeps formatting, not lines). The result is a
`YamlLocator` over dotted paths (`model_arguments.sample_sampler`, `prompt.subset[1].seed`).

JSON (OneTrainer, SimpleTuner, kohya `.json` prompt files) is located by JSON pointer
(RFC 6901: `/2/cfg_scale`), as the issue tracker and every JSON tool name a place in a file.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any, Protocol

from sidecar.errors import ConfigError
from sidecar.plan.locator import YamlLocator, join_path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib


class Locator(Protocol):
    """Where a key was written, for errors and warnings: `YamlLocator` or `JsonLocator`."""

    file: str

    def error(self, path: str, message: str) -> ConfigError: ...

    def where(self, path: str) -> str: ...


def read_text(path: Path, kind: str) -> str:
    """A config file's text, or a ConfigError saying why it cannot be read."""
    display = str(path)
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError("no such file", file=display) from None
    except IsADirectoryError:
        raise ConfigError(f"is a folder, not a {kind} file", file=display) from None
    except UnicodeDecodeError:
        raise ConfigError("is not UTF-8 text", file=display) from None
    except OSError as exc:
        raise ConfigError(f"cannot be read ({exc.strerror})", file=display) from None


# --- TOML ------------------------------------------------------------------------------

_BARE_OR_QUOTED = r'(?:[A-Za-z0-9_\-]+|"[^"\n]*"|\'[^\'\n]*\')'
_DOTTED = rf"{_BARE_OR_QUOTED}(?:\s*\.\s*{_BARE_OR_QUOTED})*"
_HEADER = re.compile(rf"^\s*(\[\[|\[)\s*({_DOTTED})\s*\]\]?")
_KEY = re.compile(rf"^\s*({_DOTTED})\s*=")
_TOML_ERROR_LINE = re.compile(r"\(at line (\d+), column \d+\)")


def _key_parts(dotted: str) -> list[str]:
    return [part.strip().strip("\"'") for part in re.findall(_BARE_OR_QUOTED, dotted)]


def _open_after(line: str, state: tuple[str | None, int]) -> tuple[str | None, int]:
    """(open multi-line string delimiter, bracket depth) after `line`, given those before it."""
    delimiter, depth = state
    i = 0
    while i < len(line):
        if delimiter is not None:
            end = line.find(delimiter, i)
            if end < 0:
                return delimiter, depth
            i, delimiter = end + 3, None
            continue
        char = line[i]
        if char == "#":
            break
        if line.startswith('"""', i) or line.startswith("'''", i):
            delimiter, i = line[i : i + 3], i + 3
            continue
        if char in "\"'":
            end = line.find(char, i + 1)
            while char == '"' and end > 0 and line[end - 1] == "\\":
                end = line.find(char, end + 1)
            i = len(line) if end < 0 else end + 1
            continue
        if char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
        i += 1
    return delimiter, max(depth, 0)


def toml_lines(text: str) -> dict[str, int]:
    """Dotted path -> 1-based line of every table, array-of-tables item and key in `text`."""
    lines: dict[str, int] = {"": 1}
    table = ""
    counts: dict[str, int] = {}  # array of tables -> items seen
    state: tuple[str | None, int] = (None, 0)
    for number, line in enumerate(text.splitlines(), start=1):
        inside = state != (None, 0)
        state = _open_after(line, state)
        if inside:
            continue
        header = _HEADER.match(line)
        if header:
            parts = _key_parts(header.group(2))
            path = ""
            for depth, part in enumerate(parts):
                path = join_path(path, part)
                name = ".".join(parts[: depth + 1])
                if name in counts and depth < len(parts) - 1:
                    path = f"{path}[{counts[name] - 1}]"
            if header.group(1) == "[[":
                name = ".".join(parts)
                counts[name] = counts.get(name, 0) + 1
                path = f"{path}[{counts[name] - 1}]"
            table = path
            lines.setdefault(table, number)
            continue
        key = _KEY.match(line)
        if key:
            path = table
            for part in _key_parts(key.group(1)):
                path = join_path(path, part)
            lines.setdefault(path, number)
    return lines


def read_toml(path: Path) -> tuple[dict[str, Any], YamlLocator]:
    """Parse a TOML file; the locator knows each key's line. Syntax errors name their line."""
    text = read_text(path, "TOML")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        message = str(exc)
        found = _TOML_ERROR_LINE.search(message)
        reason = _TOML_ERROR_LINE.sub("", message).strip()
        raise ConfigError(
            f"invalid TOML: {reason}", file=str(path), line=int(found.group(1)) if found else None
        ) from None
    return data, YamlLocator(str(path), toml_lines(text))


# --- JSON ------------------------------------------------------------------------------


def pointer(*parts: str | int) -> str:
    """A JSON pointer (RFC 6901): `pointer(2, "cfg_scale")` -> `/2/cfg_scale`."""
    return "".join("/" + str(part).replace("~", "~0").replace("/", "~1") for part in parts)


class JsonLocator:
    """Names a place in a JSON file by JSON pointer: `samples.json /2/cfg_scale:`."""

    def __init__(self, file: str) -> None:
        self.file = file

    def error(self, path: str, message: str) -> ConfigError:
        return ConfigError(message, file=self.file, yaml_path=path or None)

    def where(self, path: str) -> str:
        return self.error(path, "").location


def read_json(path: Path) -> tuple[Any, JsonLocator]:
    """Parse a JSON file; syntax errors name their line."""
    text = read_text(path, "JSON")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"invalid JSON: {exc.msg}", file=str(path), line=exc.lineno) from None
    return data, JsonLocator(str(path))
