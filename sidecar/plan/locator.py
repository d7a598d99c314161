"""A config file's values with the line each was written on, for located errors.

pydantic knows only the key path of a bad value; composing the YAML ourselves keeps
each node's line, so an error reads `train.yaml:41 config.process[0].sample.sample_steps:
must be a positive integer, got 'twenty'`.
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from sidecar.errors import ConfigError
from sidecar.values import describe_error

logger = logging.getLogger("sidecar.plan")


def join_path(prefix: str, suffix: str) -> str:
    """`config.process[0]` + `sample.width`; list indexes attach without a dot."""
    if not prefix:
        return suffix
    if not suffix:
        return prefix
    return f"{prefix}{suffix}" if suffix.startswith("[") else f"{prefix}.{suffix}"


def _loc_to_path(loc: Iterable[int | str]) -> str:
    path = ""
    for part in loc:
        path = join_path(path, f"[{part}]" if isinstance(part, int) else str(part))
    return path


def _parent_path(path: str) -> str:
    if path.endswith("]"):
        return path[: path.rindex("[")]
    return path.rpartition(".")[0]


def _index_lines(node: yaml.Node, path: str, lines: dict[str, int], depth: int = 0) -> None:
    """Record the 1-based line of every key and list item, by YAML path."""
    if depth > 64:  # recursive anchors; nothing a trainer config needs
        return
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            if isinstance(key_node, yaml.ScalarNode):
                child = join_path(path, str(key_node.value))
                lines.setdefault(child, key_node.start_mark.line + 1)
                _index_lines(value_node, child, lines, depth + 1)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            child = f"{path}[{index}]"
            lines.setdefault(child, item.start_mark.line + 1)
            _index_lines(item, child, lines, depth + 1)


@dataclass(frozen=True)
class YamlLocator:
    """Turns a YAML path into `file:line path:` for errors and warnings."""

    file: str  # the config file as the user named it
    lines: Mapping[str, int] = field(default_factory=dict, repr=False)

    def line(self, path: str) -> int | None:
        """The line of `path`, or of its nearest ancestor written in the file (a missing key)."""
        while path:
            if path in self.lines:
                return self.lines[path]
            path = _parent_path(path)
        return self.lines.get("")

    def error(self, path: str, message: str) -> ConfigError:
        return ConfigError(message, file=self.file, line=self.line(path), yaml_path=path or None)

    def where(self, path: str) -> str:
        return self.error(path, "").location


# Values a config may hold once its aliases are expanded. Trainer configs hold hundreds; an
# alias bomb ("billion laughs": nine aliases of nine aliases...) holds billions, which every
# walk of the data (line index, validation, the sample plan) would expand.
MAX_YAML_VALUES = 100_000


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [child for pair in node.value for child in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def check_expansion(root: yaml.Node, display: str, *, limit: int = MAX_YAML_VALUES) -> None:
    """Refuse a document whose aliases expand past `limit` values, or refer to themselves.

    Counted on the composed nodes (an alias is the same node object as its anchor), so
    nothing is expanded to count it. Raises `ConfigError` at the line of the smallest part
    that is too big, or of the node that contains itself.
    """
    sizes: dict[int, int] = {}
    visiting: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        key = id(node)
        if children_done:
            visiting.discard(key)
            sizes[key] = 1 + sum(sizes[id(child)] for child in _children(node))
            if sizes[key] > limit:
                raise ConfigError(
                    f"YAML aliases here expand to more than {limit} values (an alias bomb?); "
                    "a trainer config needs far fewer",
                    file=display,
                    line=node.start_mark.line + 1,
                )
            continue
        if key in sizes:
            continue
        if key in visiting:
            raise ConfigError(
                "a YAML alias refers to a value that contains it (a recursive structure); "
                "a trainer config never needs one",
                file=display,
                line=node.start_mark.line + 1,
            )
        visiting.add(key)
        stack.append((node, True))
        stack.extend((child, False) for child in _children(node) if id(child) not in sizes)


def read_yaml(path: Path) -> tuple[Any, YamlLocator]:
    """Parse once, keeping both the data and each node's line; aliases are bounded (`check_expansion`)."""
    display = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError("no such file", file=display) from None
    except IsADirectoryError:
        raise ConfigError("is a folder, not a YAML file", file=display) from None
    except UnicodeDecodeError:
        raise ConfigError("is not UTF-8 text", file=display) from None
    except OSError as exc:
        raise ConfigError(f"cannot be read ({exc.strerror})", file=display) from None
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is not None:
            check_expansion(node, display)
        data = loader.construct_document(node) if node is not None else None
    except RecursionError:
        raise ConfigError("invalid YAML: nested too deeply", file=display) from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        problem = exc.problem or exc.context or "syntax error"
        context = f" ({exc.context})" if exc.context and exc.problem else ""
        raise ConfigError(
            f"invalid YAML: {problem}{context}", file=display, line=mark.line + 1 if mark else None
        ) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"invalid YAML: {exc}", file=display) from None
    finally:
        loader.dispose()
    lines: dict[str, int] = {}
    if node is not None:
        lines[""] = node.start_mark.line + 1
        _index_lines(node, "", lines)
    return data, YamlLocator(display, lines)


def validate(model: type[BaseModel], raw: object, locator: YamlLocator, prefix: str) -> Any:
    """Validate `raw` as `model`; the first bad value (by line) becomes a located ConfigError."""
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        located = [(join_path(prefix, _loc_to_path(error["loc"])), error) for error in errors]
        path, error = min(located, key=lambda item: locator.line(item[0]) or 0)
        raise locator.error(path, describe_error(error)) from None


def warn_unknown_keys(
    raw: object, model: type[BaseModel], quiet: frozenset[str], path: str, locator: YamlLocator
) -> None:
    """A key sidecar does not know inside `sample:` or `sidecar:` is most likely a typo."""
    if not isinstance(raw, dict):
        return
    valid = set(model.model_fields)
    for key in raw:
        name = str(key)
        if name in valid:
            continue
        if name in quiet:
            logger.debug("%s not used by sidecar", locator.where(join_path(path, name)))
            continue
        nearest = difflib.get_close_matches(name, sorted(valid | quiet), n=1, cutoff=0.6)
        hint = f"did you mean `{nearest[0]}`?" if nearest else f"valid keys: {', '.join(sorted(valid))}"
        logger.warning("%s unknown key `%s` is ignored; %s", locator.where(join_path(path, name)), name, hint)
