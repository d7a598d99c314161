"""The trainer config: the YAML a user already has, read so that sidecar needs no second file.

Two shapes are read:

* ai-toolkit / EriDiffusion: `job: extension`, `config.name`, `config.process[]`, each process
  holding `training_folder`, `trigger_word`, `model`, `network`, `save`, `sample`, ...
* a flat file with a top-level `sample:` (plus `model`, `trigger_word`, `name`), for trainers
  whose own config is not YAML.

Everything else in a trainer's file is accepted and ignored. Inside `sample:` and `sidecar:` an
unknown key is probably a typo, so it is logged as a warning naming the nearest valid key. A bad
value raises `ConfigError` located as `file:line yaml.path:`; the lines come from composing the
YAML ourselves, because pydantic only knows the key path.

Relative paths (`training_folder`, the model paths): a path that exists relative to the config
file's folder is made absolute from there; anything else is kept as written, since ai-toolkit
resolves paths from its working directory and a hub id (`org/name`) is not a path at all. Paths
in the `sidecar:` section are sidecar's own and are always relative to the config file's folder.

This module reads the YAML and, to detect an architecture, at most a `model_index.json` or a
safetensors header; it never imports torch or diffusers and never touches the network.
"""

from __future__ import annotations

import difflib
import json
import logging
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, ValidationError, model_validator
from pydantic_core import PydanticCustomError

from sidecar.architectures import (
    ARCH_ALIASES,
    ARCH_SPECS,
    Arch,
    ArchSpec,
    arch_from_pipeline_class,
    arch_from_tensor_names,
)
from sidecar.checkpoints import read_header
from sidecar.errors import CheckpointError, ConfigError

logger = logging.getLogger("sidecar.config")

DEFAULT_SEED = 42
IMAGE_FORMATS = ("png", "jpg", "webp")
_INTEGER_TEXT = re.compile(r"\s*[+-]?\d+\s*")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")

# Keys real trainers write inside `sample:` that sidecar does not use: accepted without a warning.
_QUIET_SAMPLE_KEYS = frozenset(
    {
        "sample_start_step",
        "guidance_rescale",
        "adapter_conditioning_scale",
        "refiner_start_at",
        "extra_values",
        "num_frames",
        "fps",
        "sampling_flow_shift",
        "do_cfg_norm",
        "nag_scale",
        "nag_alpha",
        "nag_tau",
        "attention_backend",
        "ext",
        "sample_dir",
        "samples_dir",
    }
)
_QUIET_PROMPT_KEYS = frozenset(
    {
        "fps",
        "num_frames",
        "ctrl_img",
        "ctrl_idx",
        "ctrl_img_1",
        "ctrl_img_2",
        "ctrl_img_3",
        "do_cfg_norm",
        "nag_scale",
        "nag_alpha",
        "nag_tau",
        "extra_values",
    }
)


# --------------------------------------------------------------------------------------------
# Value rules. Each returns the clean value or raises ValueError with a short reason in
# diffusers' style ("must be a positive integer, got 'twenty'"). prompts.py reuses them for
# inline flags, so a value means the same wherever it is written.
# --------------------------------------------------------------------------------------------


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
    """A sampler name, lower-cased; sidecar/pipelines/schedulers.py decides if it is valid."""
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
    """An architecture name or alias (`flux`, `sd3.5`, `xl`...) as its canonical name."""
    if isinstance(value, str) and value.strip().lower() in ARCH_ALIASES:
        return ARCH_ALIASES[value.strip().lower()]
    raise ValueError(
        f"must be one of {', '.join(ARCH_SPECS)}, got {show(value)} (sidecar renders SDXL, SD 3.5 and Flux)"
    )


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


def _choice(*options: str, aliases: Mapping[str, str] | None = None) -> Callable[[object], str]:
    """A rule accepting one of `options` (case-insensitive) or an alias of one."""
    table = {name: name for name in options} | dict(aliases or {})

    def rule(value: object) -> str:
        if isinstance(value, str) and value.strip().lower() in table:
            return table[value.strip().lower()]
        raise ValueError(f"must be one of {', '.join(options)}, got {show(value)}")

    return rule


def _rule(function: Callable[[object], Any]) -> BeforeValidator:
    """Wrap a value rule for pydantic, keeping our message as the whole error text."""

    def validate(value: object) -> Any:
        try:
            return function(value)
        except ValueError as exc:
            raise PydanticCustomError("sidecar_value", "{reason}", {"reason": str(exc)}) from None

    return BeforeValidator(validate)


PositiveInt = Annotated[int, _rule(as_positive_int)]
NonNegativeInt = Annotated[int, _rule(as_non_negative_int)]
Number = Annotated[float, _rule(as_number)]
NonNegativeNumber = Annotated[float, _rule(as_non_negative_number)]
Flag = Annotated[bool, _rule(as_bool)]
Text = Annotated[str, _rule(as_text)]
Negative = Annotated[str, _rule(as_negative_prompt)]
SamplerName = Annotated[str, _rule(as_sampler)]
ImageFormat = Annotated[str, _rule(as_image_format)]
ArchName = Annotated[str, _rule(as_arch)]
PathValue = Annotated[Path, _rule(as_path)]
Regex = Annotated[str, _rule(as_regex)]
Quantize = Annotated[bool | str, _rule(as_quantize)]
DType = Annotated[
    Literal["auto", "bf16", "fp16", "fp32"],
    _rule(
        _choice(
            "auto",
            "bf16",
            "fp16",
            "fp32",
            aliases={"bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float32": "fp32"},
        )
    ),
]
Offload = Annotated[
    Literal["none", "model", "sequential", "group", "auto"],
    _rule(_choice("none", "model", "sequential", "group", "auto")),
]
Backlog = Annotated[Literal["all", "latest"], _rule(_choice("all", "latest"))]
LogFormat = Annotated[Literal["plain", "json"], _rule(_choice("plain", "json"))]


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------


class _Section(BaseModel):
    """A mapping of the trainer YAML: unknown keys ignored, an empty value (`key:`) means unset."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _drop_empty(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {key: value for key, value in data.items() if value is not None}
        return data


class PromptItem(_Section):
    """One entry of `sample.prompts`: a plain string, or a mapping with per-prompt settings."""

    prompt: Text
    neg: Negative | None = None
    width: PositiveInt | None = None
    height: PositiveInt | None = None
    seed: NonNegativeInt | None = None
    guidance_scale: NonNegativeNumber | None = None
    true_cfg_scale: NonNegativeNumber | None = None
    sample_steps: PositiveInt | None = None
    network_multiplier: Number | None = None
    sampler: SamplerName | None = None

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, data: Any) -> Any:
        if isinstance(data, str):
            return {"prompt": data}
        if isinstance(data, dict):
            return data
        raise PydanticCustomError(
            "sidecar_value",
            "{reason}",
            {"reason": f"must be a prompt string or a mapping with a `prompt` key, got {show(data)}"},
        )


class SampleConfig(_Section):
    """The `sample:` section. Unset sizes, steps, guidance and sampler come from the ArchSpec."""

    sampler: SamplerName | None = None
    sample_every: PositiveInt | None = None
    sample_steps: PositiveInt | None = None
    guidance_scale: NonNegativeNumber | None = None
    true_cfg_scale: NonNegativeNumber = 1.0  # Flux true CFG; 1.0 is off
    prompts: list[PromptItem] = []
    samples: list[PromptItem] | None = None  # newer ai-toolkit's name for the same list
    neg: Negative = ""
    width: PositiveInt | None = None
    height: PositiveInt | None = None
    seed: NonNegativeInt = DEFAULT_SEED
    walk_seed: Flag = False
    network_multiplier: Number = 1.0
    format: ImageFormat = "png"
    batch_size: PositiveInt = 1

    @property
    def prompts_key(self) -> str:
        """The key the prompt list was read from; ai-toolkit prefers `samples` over `prompts`."""
        return "samples" if self.samples is not None else "prompts"

    @property
    def items(self) -> list[PromptItem]:
        return self.samples if self.samples is not None else self.prompts


class ModelConfig(_Section):
    """The `model:` section. A bare string (`model: org/name`) is taken as `name_or_path`."""

    name_or_path: Text
    arch: ArchName | None = None
    is_flux: Flag = False
    is_v3: Flag = False
    is_sdxl: Flag = False
    is_xl: Flag = False  # ai-toolkit's spelling of is_sdxl
    vae_path: Text | None = None
    clip_l_path: Text | None = None
    clip_g_path: Text | None = None
    t5_path: Text | None = None
    quantize: Quantize = False
    low_vram: Flag = False

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, data: Any) -> Any:
        return {"name_or_path": data} if isinstance(data, str) else data


class NetworkConfig(_Section):
    type: Text | None = None
    linear: PositiveInt | None = None
    linear_alpha: Number | None = None


class SaveConfig(_Section):
    save_every: PositiveInt | None = None
    max_step_saves_to_keep: NonNegativeInt | None = None
    dtype: Text | None = None


class SidecarSettings(_Section):
    """sidecar's own settings: a `sidecar:` section of the trainer file, then the command line."""

    device: Text | None = None  # e.g. "cuda:1"; None lets sidecar/devices.py choose
    gpu: NonNegativeInt | None = None
    dtype: DType = "auto"
    offload: Offload = "none"
    backlog: Backlog = "all"  # on start: render every checkpoint not yet done, or only the newest
    output: PathValue | None = None  # samples dir; None: TrainerConfig.default_samples_dir
    pattern: Regex | None = None  # checkpoint file-name regex; None: each trainer's known layout
    share_gpu: NonNegativeInt | None = None  # set when sharing a GPU with the trainer (sidecar/devices.py)
    tensorboard: PathValue | None = None
    log_format: LogFormat = "plain"

    def merged(self, **overrides: object) -> SidecarSettings:
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
            name = str(error["loc"][0]) if error["loc"] else "sidecar"
            raise ConfigError(f"`--{name.replace('_', '-')}` {_humanize(error)}") from None


class _ProcessSection(_Section):
    """What sidecar reads of one ai-toolkit process, or of a flat file's top level."""

    name: Text | None = None
    type: Text | None = None
    training_folder: Text | None = None
    trigger_word: Text | None = None
    device: Text | None = None
    low_vram: Flag = False  # EriDiffusion writes it beside `model:`
    model: ModelConfig
    network: NetworkConfig | None = None
    save: SaveConfig | None = None
    sample: SampleConfig


# --------------------------------------------------------------------------------------------
# The YAML document with its line numbers
# --------------------------------------------------------------------------------------------


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


def _read_yaml(path: Path) -> tuple[Any, YamlLocator]:
    """Parse once, keeping both the data and each node's line."""
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
        data = loader.construct_document(node) if node is not None else None
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


def _humanize(error: Mapping[str, Any]) -> str:
    """A pydantic error as a short rule plus the value received."""
    kind = error["type"]
    value = error.get("input")
    if kind == "sidecar_value":
        return str(error["msg"])
    if kind == "missing":
        return "is required"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return f"must be a mapping, got {show(value)}"
    if kind in ("list_type", "tuple_type"):
        return f"must be a list, got {show(value)}"
    message = str(error["msg"])
    return f"{message[:1].lower()}{message[1:]}, got {show(value)}"


def _validate(model: type[_Section], raw: object, locator: YamlLocator, prefix: str) -> Any:
    """Validate `raw` as `model`; the first bad value (by line) becomes a located ConfigError."""
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        located = [(join_path(prefix, _loc_to_path(error["loc"])), error) for error in errors]
        path, error = min(located, key=lambda item: locator.line(item[0]) or 0)
        raise locator.error(path, _humanize(error)) from None


def _warn_unknown_keys(
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


# --------------------------------------------------------------------------------------------
# Architecture detection
# --------------------------------------------------------------------------------------------


def _arch_from_model_index(index: Path) -> tuple[Arch | None, str]:
    try:
        class_name = json.loads(index.read_text(encoding="utf-8")).get("_class_name")
    except (OSError, ValueError, AttributeError):
        return None, f"{index} is not a readable model_index.json"
    arch = arch_from_pipeline_class(str(class_name))
    return (
        arch,
        "" if arch else f"its model_index.json names {class_name!r}, not an SDXL, SD 3.5 or Flux pipeline",
    )


def read_safetensors_names(path: Path) -> list[str]:
    """Tensor names from a safetensors header; no tensor is read."""
    return list(read_header(path).tensors)


def _arch_from_safetensors(path: Path) -> tuple[Arch | None, str]:
    try:
        names = read_safetensors_names(path)
    except (OSError, CheckpointError) as exc:
        return None, f"not a readable safetensors file: {exc}"
    arch = arch_from_tensor_names(names)
    return arch, "" if arch else "its tensor names match no SDXL, SD 3.5 or Flux checkpoint"


def _cached_model_index(repo_id: str) -> Path | None:
    """model_index.json of a hub model already in the local HF cache; never downloads."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    try:
        found = try_to_load_from_cache(repo_id, "model_index.json")
    except Exception:  # an id huggingface_hub rejects is simply not cached
        return None
    return Path(found) if isinstance(found, str) else None


def detect_model_arch(name_or_path: str | Path) -> tuple[Arch | None, str]:
    """The architecture of a base model, read from the model itself, and why not when None.

    A diffusers folder's `model_index.json`, a hub id's `model_index.json` when already in the
    local Hugging Face cache, or a single-file `.safetensors` checkpoint's tensor names.
    """
    text = str(name_or_path)
    path = Path(text).expanduser()
    if path.is_dir():
        index = path / "model_index.json"
        if not index.is_file():
            return None, "a folder without model_index.json"
        return _arch_from_model_index(index)
    if path.is_file():
        if path.suffix.lower() != ".safetensors":
            return None, "only .safetensors single files can be inspected"
        return _arch_from_safetensors(path)
    if _HUB_ID.match(text):
        cached = _cached_model_index(text)
        if cached is None:
            return None, "not a local path, and its model_index.json is not in the local Hugging Face cache"
        return _arch_from_model_index(cached)
    return None, "no such file or folder"


_ARCH_FLAGS: tuple[tuple[str, Arch], ...] = (
    ("is_flux", "flux"),
    ("is_v3", "sd3"),
    ("is_sdxl", "sdxl"),
    ("is_xl", "sdxl"),
)


def _resolve_arch(model: ModelConfig, locator: YamlLocator, prefix: str) -> Arch:
    """`arch`, then the `is_*` flags, then the model files; raise naming the key to set."""
    model_path = join_path(prefix, "model")
    flagged = [(flag, arch) for flag, arch in _ARCH_FLAGS if getattr(model, flag)]
    for flag, arch in flagged[1:]:
        if arch != flagged[0][1]:
            raise locator.error(
                join_path(model_path, flag),
                f"conflicts with `{flagged[0][0]}: true`; set only one of "
                "is_flux, is_v3, is_sdxl (or `arch`)",
            )
    if model.arch is not None:
        if flagged and flagged[0][1] != model.arch:
            raise locator.error(
                join_path(model_path, "arch"),
                f"is {model.arch!r} but `{flagged[0][0]}: true` says {flagged[0][1]!r}; remove one of them",
            )
        return model.arch  # type: ignore[return-value]
    if flagged:
        return flagged[0][1]
    arch, reason = detect_model_arch(model.name_or_path)
    if arch is None:
        raise locator.error(
            model_path,
            f"cannot tell the architecture of {model.name_or_path!r} ({reason}); "
            "set `model.arch: sdxl|sd3|flux`",
        )
    return arch


# --------------------------------------------------------------------------------------------
# The loaded config
# --------------------------------------------------------------------------------------------


def resolve_relative(value: str, base: Path) -> str:
    """`~` expanded; a relative path that exists under `base` made absolute; else as written."""
    if value.startswith("~"):
        return str(Path(value).expanduser())
    path = Path(value)
    if not path.is_absolute() and (base / path).exists():
        return str((base / path).resolve())
    return value


@dataclass(frozen=True)
class TrainerConfig:
    """What sidecar needs of a trainer config, resolved; `lines` keeps where each key was written."""

    path: Path  # the config file, absolute
    name: str
    training_folder: Path | None
    trigger_word: str | None
    arch: Arch
    model: ModelConfig
    sample: SampleConfig
    sidecar: SidecarSettings
    process_index: int | None
    yaml_prefix: str  # `config.process[0]`, or "" for a flat file
    trainer_device: str | None = None  # the trainer's own `device`, a GPU to stay off
    network: NetworkConfig | None = None
    save: SaveConfig | None = None
    locator: YamlLocator = field(default_factory=lambda: YamlLocator(""), repr=False, compare=False)

    @property
    def spec(self) -> ArchSpec:
        return ARCH_SPECS[self.arch]

    @property
    def config_dir(self) -> Path:
        return self.path.parent

    @property
    def lines(self) -> Mapping[str, int]:
        """Full YAML path -> 1-based line."""
        return self.locator.lines

    def yaml_path(self, subpath: str) -> str:
        """`sample.prompts[2]` -> `config.process[0].sample.prompts[2]`."""
        return join_path(self.yaml_prefix, subpath)

    def error(self, subpath: str, message: str) -> ConfigError:
        """A ConfigError located at `subpath` (relative to the process)."""
        return self.locator.error(self.yaml_path(subpath), message)

    def where(self, subpath: str) -> str:
        """`file:line path:` for a warning about `subpath`."""
        return self.locator.where(self.yaml_path(subpath))

    def default_samples_dir(self, checkpoint: Path | None = None) -> Path:
        """`<training_folder>/<name>/samples` (ai-toolkit's layout), else `samples/` beside the checkpoint."""
        if self.training_folder is not None and self.name:
            return self.training_folder / self.name / "samples"
        if checkpoint is None:
            raise ValueError(
                "the config has no `training_folder`; pass the checkpoint to place samples beside it"
            )
        return Path(checkpoint).parent / "samples"

    def samples_dir(self, checkpoint: Path | None = None) -> Path:
        """Where images go: the `output` setting when given, else `default_samples_dir`."""
        return (
            self.sidecar.output if self.sidecar.output is not None else self.default_samples_dir(checkpoint)
        )


def _select_process(processes: object, wanted: int | str | None, locator: YamlLocator) -> tuple[int, dict]:
    """By index, by `name` then `type`, or the first process with a `sample:` section."""
    path = "config.process"
    if not isinstance(processes, list) or not processes:
        raise locator.error(path, f"must be a non-empty list of processes, got {show(processes)}")
    if isinstance(wanted, str) and wanted.strip().isdigit():
        wanted = int(wanted)
    if isinstance(wanted, int):
        if not 0 <= wanted < len(processes):
            raise locator.error(
                path,
                f"has {len(processes)} process(es); `process` must be 0..{len(processes) - 1}, got {wanted}",
            )
        index = wanted
    elif isinstance(wanted, str):
        entries = [(i, p) for i, p in enumerate(processes) if isinstance(p, dict)]
        by_name = [i for i, p in entries if p.get("name") == wanted]
        by_type = [i for i, p in entries if p.get("type") == wanted]
        if by_name:
            index = by_name[0]
        elif len(by_type) == 1:
            index = by_type[0]
        elif by_type:
            raise locator.error(path, f"processes {by_type} all have `type: {wanted}`; select one by index")
        else:
            known = ", ".join(f"{i} ({p.get('name') or p.get('type') or '?'})" for i, p in entries)
            raise locator.error(path, f"has no process named {wanted!r}; processes: {known}")
    else:
        with_sample = [i for i, p in enumerate(processes) if isinstance(p, dict) and "sample" in p]
        if not with_sample:
            raise locator.error(
                path, "has no process with a `sample:` section; add one to say what to render"
            )
        index = with_sample[0]
    entry = processes[index]
    if not isinstance(entry, dict):
        raise locator.error(f"{path}[{index}]", f"must be a mapping, got {show(entry)}")
    if "sample" not in entry:
        raise locator.error(f"{path}[{index}]", "has no `sample:` section; add one to say what to render")
    return index, entry


def _sidecar_settings(
    raw_sections: list[tuple[object, str]], locator: YamlLocator, base: Path
) -> SidecarSettings:
    """Merge `sidecar:` sections (file top level, then the process); relative paths from the config."""
    settings = SidecarSettings()
    for raw, path in raw_sections:
        if raw is None:
            continue
        _warn_unknown_keys(raw, SidecarSettings, frozenset(), path, locator)
        section: SidecarSettings = _validate(SidecarSettings, raw, locator, path)
        updates = {name: getattr(section, name) for name in section.model_fields_set}
        for name in ("output", "tensorboard"):
            value = updates.get(name)
            if isinstance(value, Path) and not value.is_absolute():
                updates[name] = base / value
        settings = settings.model_copy(update=updates)
    return settings


def load_trainer_config(path: str | Path, *, process: int | str | None = None) -> TrainerConfig:
    """Read a trainer's YAML (ai-toolkit / EriDiffusion nested, or flat `sample:`) for sidecar.

    `process` picks one of several processes, by index or by `name`/`type`; by default the first
    process with a `sample:` section. Raises ConfigError located at the offending key.
    """
    path = Path(path)
    data, locator = _read_yaml(path)
    if data is None:
        raise ConfigError("is empty; expected a trainer config with a `sample:` section", file=str(path))
    if not isinstance(data, dict):
        raise locator.error("", f"must be a mapping (a trainer config), got {show(data)}")
    base = path.resolve().parent

    nested = isinstance(data.get("config"), dict) and "process" in data["config"]
    if nested:
        index, raw = _select_process(data["config"]["process"], process, locator)
        prefix = f"config.process[{index}]"
        name_raw, name_path = data["config"].get("name"), "config.name"
        sidecar_raw = [(data.get("sidecar"), "sidecar"), (raw.get("sidecar"), join_path(prefix, "sidecar"))]
    elif "sample" in data:
        if process is not None:
            raise ConfigError(
                f"`process` was given ({process!r}) but this is a flat file with a top-level "
                "`sample:`, not a `config.process` list",
                file=str(path),
            )
        index, raw, prefix = None, data, ""
        name_raw, name_path = data.get("name"), "name"
        sidecar_raw = [(data.get("sidecar"), "sidecar")]
    else:
        raise locator.error(
            "",
            "has no `sample:` section: sidecar reads ai-toolkit / EriDiffusion files "
            "(`job: extension` with `config.process[]`) or a flat file with a top-level `sample:`",
        )

    sample_path = join_path(prefix, "sample")
    raw_sample = raw.get("sample")
    _warn_unknown_keys(raw_sample, SampleConfig, _QUIET_SAMPLE_KEYS, sample_path, locator)
    if isinstance(raw_sample, dict):
        key = "samples" if raw_sample.get("samples") is not None else "prompts"
        if key == "samples" and raw_sample.get("prompts"):
            logger.warning(
                "%s both `samples` and `prompts` are set; using `samples`, as ai-toolkit does",
                locator.where(sample_path),
            )
        items = raw_sample.get(key)
        for i, item in enumerate(items if isinstance(items, list) else []):
            _warn_unknown_keys(item, PromptItem, _QUIET_PROMPT_KEYS, f"{sample_path}.{key}[{i}]", locator)

    section: _ProcessSection = _validate(_ProcessSection, raw, locator, prefix)
    try:
        name = as_text(name_raw) if name_raw is not None else path.stem
    except ValueError as exc:
        raise locator.error(name_path, str(exc)) from None
    model = section.model
    updates: dict[str, Any] = {"name_or_path": resolve_relative(model.name_or_path, base)}
    for key in ("vae_path", "clip_l_path", "clip_g_path", "t5_path"):
        value = getattr(model, key)
        if value is not None:
            updates[key] = resolve_relative(value, base)
    if section.low_vram and "low_vram" not in model.model_fields_set:
        updates["low_vram"] = True
    model = model.model_copy(update=updates)
    arch = _resolve_arch(model, locator, prefix)

    training_folder = section.training_folder
    return TrainerConfig(
        path=path.resolve(),
        name=name,
        training_folder=Path(resolve_relative(training_folder, base)) if training_folder else None,
        trigger_word=section.trigger_word or None,
        arch=arch,
        model=model,
        sample=section.sample,
        sidecar=_sidecar_settings(sidecar_raw, locator, base),
        process_index=index,
        yaml_prefix=prefix,
        trainer_device=section.device,
        network=section.network,
        save=section.save,
        locator=locator,
    )
