"""Value rules shared by the trainer config (`sidecar.plan`) and sidecar's own settings.

Each rule returns the clean value or raises ValueError with a short reason in
diffusers' style ("must be a positive integer, got 'twenty'"). The plan reuses them
for inline prompt flags, so a value means the same wherever it is written. The
`Annotated` types wrap them for pydantic, keeping the reason as the whole message.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, model_validator
from pydantic_core import PydanticCustomError

from sidecar.arch import ARCH_SPECS, Arch, canonical_arch

IMAGE_FORMATS = ("png", "jpg", "webp")
_INTEGER_TEXT = re.compile(r"\s*[+-]?\d+\s*")


def show(value: object) -> str:
    """A value as the user wrote it, for messages: strings quoted, YAML's words for the rest."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return repr(value)


def _as_int(value: object, *, minimum: int, rule: str) -> int:
    number: int | None = None
    if isinstance(value, bool):
        number = None
    elif isinstance(value, int):
        number = value
    elif isinstance(value, float):
        number = int(value) if value.is_integer() else None
    elif isinstance(value, str):
        number = int(value) if _INTEGER_TEXT.fullmatch(value) else None
    if number is None or number < minimum:
        raise ValueError(f"must be {rule}, got {show(value)}")
    return number


def as_positive_int(value: object) -> int:
    """An integer > 0; quoted digits ("20") are accepted, as YAML writers quote freely."""
    return _as_int(value, minimum=1, rule="a positive integer")


def as_non_negative_int(value: object) -> int:
    """An integer >= 0 (seeds: sidecar needs fixed seeds so samples compare across steps)."""
    return _as_int(value, minimum=0, rule="a non-negative integer")


def as_number(value: object, *, minimum: float | None = None) -> float:
    """A finite number, optionally >= `minimum`; quoted numbers are accepted."""
    rule = (
        "a number"
        if minimum is None
        else ("a non-negative number" if minimum == 0 else f"a number >= {minimum:g}")
    )
    number: float | None = None
    if isinstance(value, bool):
        number = None
    elif isinstance(value, (int, float)):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            number = None
    if number is None or not math.isfinite(number) or (minimum is not None and number < minimum):
        raise ValueError(f"must be {rule}, got {show(value)}")
    return number


def as_non_negative_number(value: object) -> float:
    return as_number(value, minimum=0)


_TRUE_WORDS = frozenset({"true", "yes", "on", "1"})
_FALSE_WORDS = frozenset({"false", "no", "off", "0"})


def as_bool(value: object) -> bool:
    """true/false, also the words YAML 1.2 stopped accepting (yes/no/on/off) when quoted."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE_WORDS | _FALSE_WORDS:
        return value.strip().lower() in _TRUE_WORDS
    raise ValueError(f"must be true or false, got {show(value)}")


def as_text(value: object) -> str:
    """A string; bare YAML numbers (`trigger_word: 1234`) are taken as the text they were."""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise ValueError(f"must be a string, got {show(value)}")


def as_negative_prompt(value: object) -> str:
    """ai-toolkit's `neg` defaults to `false`; false and null mean no negative prompt."""
    if value is None or value is False:
        return ""
    return as_text(value)


def as_sampler(value: object) -> str:
    """A sampler name, lower-cased; `sidecar.samplers` decides if it is valid for the architecture."""
    if isinstance(value, str) and value.strip():
        return value.strip().lower()
    raise ValueError(f"must be a sampler name such as 'euler', got {show(value)}")


def as_image_format(value: object) -> str:
    """png, jpg (or jpeg) or webp, normalised to the file extension sidecar writes."""
    if isinstance(value, str):
        name = value.strip().lower().lstrip(".")
        name = "jpg" if name == "jpeg" else name
        if name in IMAGE_FORMATS:
            return name
    raise ValueError(f"must be one of png, jpg, jpeg, webp, got {show(value)}")


def as_arch(value: object) -> Arch:
    """An architecture name or alias (`flux`, `sd3.5`, `zimage:turbo`...) as its canonical name."""
    arch = canonical_arch(value) if isinstance(value, str) else None
    if arch is not None:
        return arch
    raise ValueError(f"must be one of {', '.join(ARCH_SPECS)}, got {show(value)}")


def as_path(value: object) -> Path:
    if isinstance(value, (str, Path)) and str(value).strip():
        return Path(str(value).strip()).expanduser()
    raise ValueError(f"must be a path, got {show(value)}")


def as_regex(value: object) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"must be a regular expression, got {show(value)}")
    try:
        re.compile(value)
    except re.error as exc:
        raise ValueError(f"must be a valid regular expression ({exc}), got {show(value)}") from None
    return value


def as_quantize(value: object) -> bool | str:
    """ai-toolkit writes `quantize: true`; newer versions also name a type (`qfloat8`)."""
    try:
        return as_bool(value)
    except ValueError:
        if isinstance(value, str) and value.strip():
            return value.strip().lower()
        raise ValueError(f"must be true, false or a quantization type, got {show(value)}") from None


def choice(*options: str, aliases: Mapping[str, str] | None = None) -> Callable[[object], str]:
    """A rule accepting one of `options` (case-insensitive) or an alias of one."""
    table = {name: name for name in options} | dict(aliases or {})

    def check(value: object) -> str:
        if isinstance(value, str) and value.strip().lower() in table:
            return table[value.strip().lower()]
        raise ValueError(f"must be one of {', '.join(options)}, got {show(value)}")

    return check


def describe_error(error: Mapping[str, Any]) -> str:
    """A pydantic error as a short rule plus the value received."""
    kind = error["type"]
    value = error.get("input")
    if kind == "sidecar_value":
        return str(error["msg"])
    if kind == "value_error":  # a model validator's ValueError: its message says it all
        return str(error["msg"]).removeprefix("Value error, ")
    if kind == "missing":
        return "is required"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return f"must be a mapping, got {show(value)}"
    if kind in ("list_type", "tuple_type"):
        return f"must be a list, got {show(value)}"
    message = str(error["msg"])
    return f"{message[:1].lower()}{message[1:]}, got {show(value)}"


def rule(function: Callable[[object], Any]) -> BeforeValidator:
    """Wrap a value rule for pydantic, keeping our message as the whole error text."""

    def validate(value: object) -> Any:
        try:
            return function(value)
        except ValueError as exc:
            raise PydanticCustomError("sidecar_value", "{reason}", {"reason": str(exc)}) from None

    return BeforeValidator(validate)


PositiveInt = Annotated[int, rule(as_positive_int)]
NonNegativeInt = Annotated[int, rule(as_non_negative_int)]
Number = Annotated[float, rule(as_number)]
NonNegativeNumber = Annotated[float, rule(as_non_negative_number)]
Flag = Annotated[bool, rule(as_bool)]
Text = Annotated[str, rule(as_text)]
Negative = Annotated[str, rule(as_negative_prompt)]
SamplerName = Annotated[str, rule(as_sampler)]
ImageFormat = Annotated[str, rule(as_image_format)]
ArchName = Annotated[str, rule(as_arch)]
PathValue = Annotated[Path, rule(as_path)]
Regex = Annotated[str, rule(as_regex)]
Quantize = Annotated[bool | str, rule(as_quantize)]


class Section(BaseModel):
    """A mapping of a config file: unknown keys ignored, an empty value (`key:`) means unset."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _drop_empty(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {key: value for key, value in data.items() if value is not None}
        return data
