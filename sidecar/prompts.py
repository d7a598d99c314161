"""The sample plan: a trainer's `sample:` section turned into concrete sample requests.

CONTRACT (shared with the renderers, the job store and output; keep the fields):
`SampleRequest` is one fully resolved image.

How one prompt becomes a request, in order:

1. settings layer up: the architecture's defaults (`ArchSpec`), then the `sample:` section, then a
   prompt's own mapping keys, then inline flags in its text (`--w 768 --n blurry`), which win, as
   in ai-toolkit and kohya sd-scripts;
2. the seed: a per-prompt seed (`seed:` or `--d`/`--seed`) wins; else `sample.seed` (42), plus the
   prompt's index when `walk_seed: true`;
3. wildcards: `__name__` picks a line of `wildcards/name.txt` beside the config and `{a|b|c}` one
   option, from a `random.Random` seeded by the prompt's seed, index and text, so the prompt is
   the same at every step. Choices resolve innermost first, so nesting works; a wildcard may
   itself hold wildcards, up to `WILDCARD_MAX_DEPTH` rounds;
4. the trigger word, put in before and after the wildcards, replaces `{trigger_word}`
   (EriDiffusion), `[trigger]` and `[name]` (ai-toolkit, whose `[name]` also means the trigger
   word in prompts). As ai-toolkit does for samples, the trigger is not added to a prompt that
   lacks it. With no trigger word set, a placeholder is removed, with a warning.

Flux guidance: in the YAML (ai-toolkit's meaning) `--l`/`--cfg` set the embedded guidance like
`guidance_scale`, and `--g` also does and wins; in a kohya prompt file `--l` is true CFG
(`true_cfg_scale`) and `--g` the embedded guidance. SDXL and SD 3.5 ignore `--g` with a warning.
"""

from __future__ import annotations

import difflib
import logging
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sidecar.architectures import ArchSpec
from sidecar.config import (
    PromptItem,
    TrainerConfig,
    as_non_negative_int,
    as_non_negative_number,
    as_number,
    as_positive_int,
    as_sampler,
)
from sidecar.errors import ConfigError, SamplerError
from sidecar.pipelines.schedulers import validate_sampler

logger = logging.getLogger("sidecar.prompts")

DEFAULT_STRENGTH = 1.0
TRIGGER_PLACEHOLDERS = ("{trigger_word}", "[trigger]", "[name]")
WILDCARD_DIR = "wildcards"  # beside the config file
WILDCARD_MAX_DEPTH = 10  # rounds of wildcards inside wildcards before giving up

_FLAG_SPLIT = re.compile(r"\s+--(?=[A-Za-z])")  # " --w 768"; a "--" inside a word is text
_WILDCARD = re.compile(r"__([A-Za-z0-9][\w\-/]*?)__")
_CHOICE = re.compile(r"\{([^{}]*\|[^{}]*)\}")  # innermost {a|b}; {trigger_word} has no "|"

# Inline flag -> setting. Short forms are kohya's; long ones ai-toolkit's additions.
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
# Flags trainers know that sidecar does not render: ignored with a warning naming them.
_UNSUPPORTED_FLAGS = frozenset({"p2", "n2", "gr", "a", "f", "fs", "cn", "ctr", "am", "i"})

_FLAG_RULES: dict[str, Callable[[object], object]] = {
    "width": as_positive_int,
    "height": as_positive_int,
    "seed": as_non_negative_int,
    "cfg": as_non_negative_number,
    "embedded_guidance": as_non_negative_number,
    "steps": as_positive_int,
    "strength": as_number,
    "sampler": as_sampler,
}


@dataclass(frozen=True)
class SampleRequest:
    """One image to render, every setting resolved; nothing is left to a default."""

    index: int  # position in the sample list; names the files sample_{index:02d}.*
    prompt: str  # final text: trigger word and wildcards resolved, inline flags removed
    negative_prompt: str
    width: int
    height: int
    steps: int
    guidance_scale: float  # CFG on SDXL / SD 3.5; embedded (distilled) guidance on Flux
    true_cfg_scale: float  # Flux only: > 1 with a negative prompt runs true CFG; 1.0 is off
    sampler: str  # a name from pipelines/schedulers.py, e.g. "euler_a", "flowmatch"
    seed: int
    strength: float  # LoRA multiplier (`network_multiplier`, `--m`); 0 renders the base

    def batch_key(self) -> tuple:
        """Requests with equal keys can render in one pipeline call."""
        return (
            self.width,
            self.height,
            self.steps,
            self.guidance_scale,
            self.true_cfg_scale,
            self.sampler,
            self.strength,
        )


@dataclass(frozen=True)
class SamplePlan:
    """Everything to render for one checkpoint; the same for every step of a run."""

    requests: tuple[SampleRequest, ...]
    image_format: str  # "png" | "jpg" | "webp"
    batch_size: int
    sample_every: int | None  # the trainer's cadence, for display; sidecar renders what appears


@dataclass(frozen=True)
class _Origin:
    """Where a prompt was written: a YAML path in the config, or a line of a prompt file."""

    config: TrainerConfig
    subpath: str | None = None  # e.g. `sample.prompts[2]`
    file: Path | None = None
    line: int | None = None

    def error(self, message: str) -> ConfigError:
        if self.subpath is not None:
            return self.config.error(self.subpath, message)
        return ConfigError(message, file=str(self.file), line=self.line)

    def where(self) -> str:
        return self.error("").location


@dataclass(frozen=True)
class _Source:
    text: str
    item: PromptItem | None
    origin: _Origin


def parse_prompt_flags(text: str, origin: _Origin | None = None) -> tuple[str, dict[str, object]]:
    """Split `a dog --n blurry --w 768` into the prompt and its settings; bad values raise."""
    parts = _FLAG_SPLIT.split(text.strip())
    settings: dict[str, object] = {}
    for part in parts[1:]:
        flag, _, value = part.partition(" ")
        flag, value = flag.lower(), value.strip()
        name = _FLAGS.get(flag)
        where = origin.where() + " " if origin else ""
        if name is None:
            if flag in _UNSUPPORTED_FLAGS:
                logger.warning("%sflag `--%s` is not used by sidecar; ignored", where, flag)
            else:
                nearest = difflib.get_close_matches(flag, list(_FLAGS), n=1, cutoff=0.5)
                hint = f"; did you mean `--{nearest[0]}`?" if nearest else ""
                logger.warning("%sunknown flag `--%s` is ignored%s", where, flag, hint)
            continue
        if name == "negative":
            settings[name] = value
            continue
        try:
            settings[name] = _FLAG_RULES[name](value)
        except ValueError as exc:
            message = f"`--{flag}` {exc}"
            raise origin.error(message) if origin else ConfigError(message) from None
    return parts[0].strip(), settings


def read_prompt_file(path: Path) -> list[tuple[int, str]]:
    """A kohya prompt file: one prompt per line; `#` comments and blank lines skipped."""
    if path.suffix.lower() in (".toml", ".json"):
        raise ConfigError(
            "kohya .toml / .json prompt files are not supported; use a .txt file, one prompt per line",
            file=str(path),
        )
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError("no such prompt file", file=str(path)) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot be read as a UTF-8 text file ({exc})", file=str(path)) from None
    return [
        (number, line.strip())
        for number, line in enumerate(text.splitlines(), start=1)
        if line.strip() and not line.strip().startswith("#")
    ]


class _Wildcards:
    """`wildcards/<name>.txt` beside the config, each read once per plan."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._options: dict[str, list[str]] = {}

    def options(self, name: str, origin: _Origin) -> list[str]:
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

    def resolve(self, text: str, rng: random.Random, origin: _Origin) -> str:
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


def apply_trigger(text: str, trigger_word: str | None, origin: _Origin | None = None) -> str:
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


def _snap(value: int, spec: ArchSpec, key: str, origin: _Origin) -> int:
    """Round a size down to the architecture's multiple, warning with the old and new value."""
    snapped = value - value % spec.size_multiple
    if snapped <= 0:
        raise origin.error(
            f"`{key}` must be at least {spec.size_multiple} ({spec.label} sizes are "
            f"multiples of {spec.size_multiple}), got {value}"
        )
    if snapped != value:
        logger.warning(
            "%s `%s` %d is not a multiple of %d for %s; using %d",
            origin.where(),
            key,
            value,
            spec.size_multiple,
            spec.label,
            snapped,
        )
    return snapped


def _sources(config: TrainerConfig, prompts_file: Path | None) -> list[_Source]:
    if prompts_file is not None:
        path = Path(prompts_file)
        return [
            _Source(text, None, _Origin(config, file=path, line=line))
            for line, text in read_prompt_file(path)
        ]
    key = config.sample.prompts_key
    return [
        _Source(item.prompt, item, _Origin(config, subpath=f"sample.{key}[{i}]"))
        for i, item in enumerate(config.sample.items)
    ]


def _first(*values: object) -> object:
    return next((value for value in values if value is not None), None)


def _sampler(config: TrainerConfig, flag: object, own: str | None, origin: _Origin) -> str:
    """The canonical sampler name, checked against the architecture's table, errors located."""
    name = _first(flag, own, config.sample.sampler, config.spec.default_sampler)
    try:
        return validate_sampler(config.arch, str(name))
    except SamplerError as error:
        if flag is None and own is None and config.sample.sampler is not None:
            raise config.error("sample.sampler", str(error)) from None
        raise origin.error(str(error)) from None


def build_plan(config: TrainerConfig, *, prompts_file: Path | None = None) -> SamplePlan:
    """The concrete requests for `config`'s sample section (or a kohya `prompts_file` instead)."""
    spec, sample = config.spec, config.sample
    is_flux = config.arch == "flux"
    sources = _sources(config, prompts_file)
    if not sources:
        if prompts_file is not None:
            raise ConfigError("has no prompts (every line is blank or a # comment)", file=str(prompts_file))
        raise config.error(
            f"sample.{sample.prompts_key}", "has no prompts; add at least one to render samples"
        )

    section = _Origin(config, subpath="sample")
    base_width = _snap(
        sample.width or spec.default_size,
        spec,
        "width",
        _Origin(config, subpath="sample.width") if sample.width else section,
    )
    base_height = _snap(
        sample.height or spec.default_size,
        spec,
        "height",
        _Origin(config, subpath="sample.height") if sample.height else section,
    )
    if not is_flux and sample.true_cfg_scale != 1.0:
        logger.warning(
            "%s `true_cfg_scale` is for Flux only; ignored on %s",
            config.where("sample.true_cfg_scale"),
            spec.label,
        )
    wildcards = _Wildcards(config.config_dir / WILDCARD_DIR)

    requests = []
    for index, source in enumerate(sources):
        item, origin = source.item, source.origin
        text, flags = parse_prompt_flags(source.text, origin)
        if item is None:
            item = PromptItem(prompt=text)

        cfg, embedded = flags.get("cfg"), flags.get("embedded_guidance")
        true_cfg = _first(item.true_cfg_scale, sample.true_cfg_scale)
        if is_flux and prompts_file is not None:  # kohya: --l is true CFG, --g the embedded guidance
            guidance = _first(embedded, item.guidance_scale, sample.guidance_scale, spec.default_guidance)
            true_cfg = _first(cfg, true_cfg)
        elif is_flux:  # ai-toolkit: --l / --cfg and --g both set the embedded guidance; --g wins
            guidance = _first(
                embedded, cfg, item.guidance_scale, sample.guidance_scale, spec.default_guidance
            )
        else:
            if embedded is not None:
                logger.warning(
                    "%s `--g` (Flux embedded guidance) is ignored on %s; use `--l`",
                    origin.where(),
                    spec.label,
                )
            if item.true_cfg_scale is not None and item.true_cfg_scale != 1.0:
                logger.warning(
                    "%s `true_cfg_scale` is for Flux only; ignored on %s", origin.where(), spec.label
                )
            guidance = _first(cfg, item.guidance_scale, sample.guidance_scale, spec.default_guidance)
            true_cfg = 1.0

        own_seed = _first(flags.get("seed"), item.seed)
        seed = own_seed if own_seed is not None else sample.seed + (index if sample.walk_seed else 0)
        width = _first(flags.get("width"), item.width)
        height = _first(flags.get("height"), item.height)

        negative = str(_first(flags.get("negative"), item.neg, sample.neg))
        rng = random.Random(f"{seed}:{index}:{source.text}")
        # The trigger goes in before wildcards (so `{a [trigger]|b}` is a plain choice) and again
        # after (so a wildcard file may hold placeholders too).
        trigger = config.trigger_word
        prompt = wildcards.resolve(apply_trigger(text, trigger, origin), rng, origin)
        negative = wildcards.resolve(apply_trigger(negative, trigger, origin), rng, origin)
        requests.append(
            SampleRequest(
                index=index,
                prompt=apply_trigger(prompt, trigger, origin),
                negative_prompt=apply_trigger(negative, trigger, origin),
                width=_snap(int(width), spec, "width", origin) if width is not None else base_width,
                height=_snap(int(height), spec, "height", origin) if height is not None else base_height,
                steps=int(
                    _first(flags.get("steps"), item.sample_steps, sample.sample_steps, spec.default_steps)
                ),
                guidance_scale=float(guidance),
                true_cfg_scale=float(true_cfg),
                sampler=_sampler(config, flags.get("sampler"), item.sampler, origin),
                seed=int(seed),
                strength=float(
                    _first(
                        flags.get("strength"),
                        item.network_multiplier,
                        sample.network_multiplier,
                        DEFAULT_STRENGTH,
                    )
                ),
            )
        )
    return SamplePlan(
        requests=tuple(requests),
        image_format=sample.format,
        batch_size=sample.batch_size,
        sample_every=sample.sample_every,
    )


def _number(value: float) -> str:
    return f"{value:g}"


def format_plan(config: TrainerConfig, plan: SamplePlan) -> str:
    """The text `sidecar check CONFIG` prints: what will be rendered, with every value resolved."""
    try:
        samples_dir = str(config.samples_dir())
    except ValueError:
        samples_dir = "samples/ beside each checkpoint"
    where = f" ({config.yaml_prefix})" if config.yaml_prefix else ""
    every = f", every {plan.sample_every} steps" if plan.sample_every else ""
    header = [
        ("config", f"{config.path}{where}"),
        ("architecture", f"{config.spec.label} ({config.arch})"),
        ("base model", config.model.name_or_path),
        ("trigger word", config.trigger_word or "(none)"),
        ("samples dir", samples_dir),
        ("images", f"{plan.image_format}, batch size {plan.batch_size}{every}"),
    ]
    label_width = max(len(label) for label, _ in header)
    lines = [f"{label:<{label_width}}  {value}" for label, value in header]

    is_flux = config.arch == "flux"
    columns = [
        "#",
        "size",
        "steps",
        "sampler",
        "guidance",
        *(["true cfg"] if is_flux else []),
        "seed",
        "strength",
        "prompt",
    ]
    rows = []
    for request in plan.requests:
        rows.append(
            [
                f"{request.index:02d}",
                f"{request.width}x{request.height}",
                str(request.steps),
                request.sampler,
                _number(request.guidance_scale),
                *([_number(request.true_cfg_scale)] if is_flux else []),
                str(request.seed),
                _number(request.strength),
                request.prompt,
            ]
        )
    widths = [max(len(column), *(len(row[i]) for row in rows)) for i, column in enumerate(columns[:-1])]
    indent = "  "

    def render(cells: list[str]) -> str:
        fixed = "  ".join(f"{cell:<{width}}" for cell, width in zip(cells[:-1], widths, strict=True))
        return f"{indent}{fixed}  {cells[-1]}".rstrip()

    lines += ["", f"{len(plan.requests)} sample(s):", render(columns)]
    negative_indent = " " * (len(indent) + sum(widths) + 2 * len(widths))
    for request, row in zip(plan.requests, rows, strict=True):
        lines.append(render(row))
        lines.append(f"{negative_indent}negative: {request.negative_prompt or '(none)'}")
    return "\n".join(lines)
