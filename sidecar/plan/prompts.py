"""One prompt's text: inline flags, kohya prompt files, wildcards and the trigger word.

Inline flags are written as ai-toolkit and kohya sd-scripts write them (`a dog --n blurry
--w 768`); they win over every other setting. Wildcards: `__name__` picks a line of
`wildcards/name.txt` beside the config and `{a|b|c}` one option, drawn from a
`random.Random` the caller seeds per prompt, so a prompt is the same at every step.
Choices resolve innermost first, so nesting works; a wildcard may itself hold wildcards,
up to `WILDCARD_MAX_DEPTH` rounds. The trigger word replaces `{trigger_word}`
(EriDiffusion), `[trigger]` and `[name]` (ai-toolkit); without one set, a placeholder is
removed with a warning.
"""

from __future__ import annotations

import difflib
import logging
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from sidecar.errors import ConfigError
from sidecar.plan.config import TrainerConfig
from sidecar.plan.models import PromptItem
from sidecar.values import (
    as_non_negative_int,
    as_non_negative_number,
    as_number,
    as_positive_int,
    as_sampler,
    as_text,
)

logger = logging.getLogger("sidecar.plan")

TRIGGER_PLACEHOLDERS = ("{trigger_word}", "[trigger]", "[name]")
WILDCARD_DIR = "wildcards"  # beside the config file
WILDCARD_MAX_DEPTH = 10  # rounds of wildcards inside wildcards before giving up

_FLAG_SPLIT = re.compile(r"\s+--(?=[A-Za-z])")  # " --w 768"; a "--" inside a word is text
_WILDCARD = re.compile(r"__([A-Za-z0-9][\w\-/]*?)__")
_CHOICE = re.compile(r"\{([^{}]*\|[^{}]*)\}")  # innermost {a|b}; {trigger_word} has no "|"

# Inline flag -> setting. Short forms are kohya's (sd-scripts `line_to_prompt_dict` in
# library/train_util.py); long ones ai-toolkit's additions. kohya and musubi-tuner read `--l`
# as CFG (true CFG on Flux) and `--g` as Flux's embedded guidance; ai-toolkit reads both as
# the guidance it passes (see `sidecar.plan.build`).
_FLAGS: dict[str, str] = {
    "n": "negative",
    "w": "width",
    "h": "height",
    "d": "seed",
    "seed": "seed",
    "l": "cfg",
    "cfg": "cfg",
    "s": "steps",
    "steps": "steps",
    "m": "strength",
    "network_multiplier": "strength",
    "g": "embedded_guidance",
    "ss": "sampler",
}
# ai-toolkit's video and control-image flags (`_process_prompt_string` in toolkit/config_modules.py)
# and musubi-tuner's (src/musubi_tuner/training/sampling_prompts.py): frames, the image-to-video
# start image and control images, carried in the request.
_AITOOLKIT_FLAGS: dict[str, str] = {
    **_FLAGS,
    "frames": "num_frames",
    "num_frames": "num_frames",
    "fps": "fps",
    "ctrl_img": "control_image",
}
_MUSUBI_FLAGS: dict[str, str] = {**_FLAGS, "f": "num_frames", "i": "init_image", "ci": "control_image"}
_DIALECT_FLAGS = {"aitoolkit": _AITOOLKIT_FLAGS, "kohya": _FLAGS, "musubi": _MUSUBI_FLAGS}
# Flags trainers know that sidecar does not use: ignored with a warning naming them.
_UNSUPPORTED_FLAGS = frozenset(
    {"p2", "n2", "gr", "a", "ref", "ev", "extra_values", "ctrl_idx"}  # ai-toolkit
    | {"f", "fs", "cn", "ctr", "rcfg", "am", "i", "ci", "ei", "of"}  # kohya, musubi-tuner
)

_FLAG_RULES: dict[str, Callable[[object], object]] = {
    "width": as_positive_int,
    "height": as_positive_int,
    "seed": as_non_negative_int,
    "cfg": as_non_negative_number,
    "embedded_guidance": as_non_negative_number,
    "steps": as_positive_int,
    "strength": as_number,
    "sampler": as_sampler,
    "num_frames": as_positive_int,
    "fps": as_positive_int,
    "init_image": as_text,
}


@dataclass(frozen=True)
class Origin:
    """Where a prompt was written: a path in the config, or a line (or key) of a prompt file."""

    config: TrainerConfig
    subpath: str | None = None  # e.g. `sample.prompts[2]`
    file: Path | None = None
    line: int | None = None
    key: str | None = None  # inside `file`: a TOML path or a JSON pointer

    def error(self, message: str) -> ConfigError:
        if self.subpath is not None:
            return self.config.error(self.subpath, message)
        return ConfigError(message, file=str(self.file), line=self.line, yaml_path=self.key)

    def where(self) -> str:
        return self.error("").location


# How a source's text is read: "plain" text has no inline flags (OneTrainer, SimpleTuner,
# kohya's .toml / .json prompt entries, which those trainers never parse for flags).
SourceDialect = Literal["aitoolkit", "kohya", "musubi", "plain"]


@dataclass(frozen=True)
class Source:
    text: str
    item: PromptItem | None
    origin: Origin
    dialect: SourceDialect = "aitoolkit"


def parse_prompt_flags(
    text: str, origin: Origin | None = None, *, dialect: SourceDialect = "aitoolkit"
) -> tuple[str, dict[str, object]]:
    """Split `a dog --n blurry --w 768` into the prompt and its settings; bad values raise.

    `plain` text is returned whole: its trainer reads no flags.
    """
    if dialect == "plain":
        return text.strip(), {}
    flags = _DIALECT_FLAGS[dialect]
    parts = _FLAG_SPLIT.split(text.strip())
    settings: dict[str, object] = {}
    for part in parts[1:]:
        flag, _, value = part.partition(" ")
        flag, value = flag.lower(), value.strip()
        name = flags.get(flag)
        where = origin.where() + " " if origin else ""
        if name is None:
            if flag in _UNSUPPORTED_FLAGS:
                logger.warning("%sflag `--%s` is not used by sidecar; ignored", where, flag)
            else:
                nearest = difflib.get_close_matches(flag, list(flags), n=1, cutoff=0.5)
                hint = f"; did you mean `--{nearest[0]}`?" if nearest else ""
                logger.warning("%sunknown flag `--%s` is ignored%s", where, flag, hint)
            continue
        if name == "negative":
            settings[name] = value
            continue
        if name == "control_image":  # musubi's `--ci` may be given several times
            settings.setdefault("control_images", []).append(value)  # type: ignore[union-attr]
            continue
        try:
            settings[name] = _FLAG_RULES[name](value)
        except ValueError as exc:
            message = f"`--{flag}` {exc}"
            raise origin.error(message) if origin else ConfigError(message) from None
    return parts[0].strip(), settings


def prompt_lines(text: str) -> list[tuple[int, str]]:
    """A kohya `.txt` prompt file's prompts with their line numbers: one per line, `#` comments
    and blank lines skipped (sd-scripts `load_prompts` in library/train_util.py)."""
    return [
        (number, line.strip())
        for number, line in enumerate(text.splitlines(), start=1)
        if line.strip() and not line.strip().startswith("#")
    ]


class Wildcards:
    """`wildcards/<name>.txt` beside the config, each read once per plan."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._options: dict[str, list[str]] = {}

    def options(self, name: str, origin: Origin) -> list[str]:
        if name not in self._options:
            if ".." in Path(name).parts:
                raise origin.error(f"wildcard `__{name}__` must name a file inside {WILDCARD_DIR}/")
            path = self.folder / f"{name}.txt"
            try:
                lines = path.read_text(encoding="utf-8").splitlines()
            except OSError:
                raise origin.error(f"wildcard `__{name}__` needs {path}, which does not exist") from None
            options = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
            if not options:
                raise origin.error(f"wildcard `__{name}__`: {path} has no options")
            self._options[name] = options
        return self._options[name]

    def resolve(self, text: str, rng: random.Random, origin: Origin) -> str:
        """Replace every `__name__` and `{a|b}`, drawing from `rng` in textual order."""
        for _ in range(WILDCARD_MAX_DEPTH):
            before = text
            text = _WILDCARD.sub(lambda m: rng.choice(self.options(m.group(1), origin)), text)
            while _CHOICE.search(text):
                text = _CHOICE.sub(lambda m: rng.choice(m.group(1).split("|")).strip(), text, count=1)
            if text == before:
                return text
        logger.warning(
            "%s wildcards still unresolved after %d rounds (a wildcard that names itself?)",
            origin.where(),
            WILDCARD_MAX_DEPTH,
        )
        return text


def _tidy(text: str) -> str:
    """Spacing left after removing a placeholder: doubled spaces, a space before a comma, stray commas."""
    text = re.sub(r"\s{2,}", " ", text)
    text = re.sub(r"\s+([,.;:])", r"\1", text)
    text = re.sub(r",\s*,", ",", text)
    return text.strip(" ,")


def apply_trigger(text: str, trigger_word: str | None, origin: Origin | None = None) -> str:
    """Put the trigger word in its placeholders; without one, remove them with a warning."""
    used = [placeholder for placeholder in TRIGGER_PLACEHOLDERS if placeholder in text]
    if not used:
        return text
    if trigger_word:
        for placeholder in used:
            text = text.replace(placeholder, trigger_word)
        return text
    where = origin.where() + " " if origin else ""
    logger.warning("%s%s used but no `trigger_word` is set; removed", where, " ".join(f"`{p}`" for p in used))
    for placeholder in used:
        text = text.replace(placeholder, "")
    return _tidy(text)
